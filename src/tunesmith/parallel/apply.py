"""`parallelize(model, cfg, ctx, rt)`: float8 -> tensor parallel -> context parallel -> tiled MLP
-> activation checkpointing -> activation offload -> compile -> data parallel, the order in
which the pieces compose:

* float8 training (train.float8) first: it swaps nn.Linear layers for torchao Float8Linear
  (same parameters), so compile traces the float8 casts and FSDP2 shards those layers.

* TP first: it replaces parameters by DTensors on the TP mesh and adds the input/output
  redistribution hooks that everything after must see as part of the block. Expert
  parallelism (parallel.ep, MoE) is placed alike: the experts become DTensors Shard(0) on the
  ep mesh, and FSDP2 later gives them units of their own.
* context parallelism (parallel.cp) marks the model: the objective then splits each batch along
  the sequence and attention runs as ring attention over the cp ranks (`parallel.cp`); no
  module changes, so everything below wraps the same blocks.
* tiled MLP (parallel.mlp_chunk_size) wraps each block's MLP in per-chunk checkpoints, inside
  the block so that AC's block checkpoint encloses it.
* AC wraps each block's forward (hooks stay outside the recomputed region).
* activation offload wraps that (saved tensors of the block, or AC's kept inputs, to the host).
* compile each block in place (FQNs unchanged; one graph shared by all blocks).
* FSDP2 last: it shards whatever parameters it finds (DTensors under TP -> 2-D sharding) and
  its hooks must be outermost, so compile does not trace its collectives.

Works on a meta-device model (nothing allocated), which is how large models are built; see
`tunesmith.parallel.loading.materialize`.
"""

from __future__ import annotations

import logging

from torch import nn

from tunesmith.config.schema import RunConfig
from tunesmith.errors import ConfigError
from tunesmith.models.registry import family_of
from tunesmith.parallel.ac import apply_activation_checkpointing
from tunesmith.parallel.cp import apply_context_parallel
from tunesmith.parallel.dist import ParallelContext
from tunesmith.parallel.fsdp import apply_ddp, apply_fsdp, apply_fsdp_experts, mp_policy
from tunesmith.parallel.offload import apply_activation_offload
from tunesmith.parallel.tiled_mlp import apply_tiled_mlp
from tunesmith.parallel.tp import apply_tp
from tunesmith.runtime import Runtime
from tunesmith.transforms.float8 import apply_float8

log = logging.getLogger("tunesmith")


def inductor_options(options: dict) -> dict | None:
    """train.compile_options checked against TorchInductor's config (a typo would otherwise
    only surface as a warning deep inside the first compiled step); None when empty."""
    if not options:
        return None
    import difflib

    import torch._inductor.config as inductor_config

    known = set(inductor_config.get_config_copy())
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"train.compile_options: {key!r} is not a TorchInductor option{hint}")
    return dict(options)


def _dp_mesh(ctx: ParallelContext):
    """FSDP2's mesh: parameters shard over dp_shard x cp (cp ranks need the same weights, and
    their gradients for different tokens are reduced like data-parallel ones)."""
    assert ctx.mesh is not None
    if ctx.layout.strategy == "hybrid_shard":
        return ctx.mesh["dp_replicate", "dp_shard_cp"]  # 2-D: replicate outer, shard inner
    return ctx.mesh["dp_shard_cp"]


def _compile_blocks(model: nn.Module, cfg: RunConfig) -> None:
    """Regional compile: each block in place (state-dict keys unchanged); blocks share one
    graph, so compile time does not grow with depth."""
    options = inductor_options(cfg.train.compile_options)
    for block in model.layers:  # type: ignore[attr-defined]
        block.compile(options=options)


def _shard(model: nn.Module, cfg: RunConfig, ctx: ParallelContext, rt: Runtime,
           experts: list[nn.Module] | None = None) -> None:
    """FSDP2 (or HSDP) over the data-parallel mesh, in the run's mixed-precision policy;
    expert-parallel experts in units of their own over the ranks holding the same experts."""
    pc = cfg.parallel
    mp = mp_policy(rt.compute_dtype, rt.param_dtype, pc.reduce_dtype)
    if experts:
        assert ctx.ep_mesh is not None
        apply_fsdp_experts(experts, ctx.ep_mesh["ep_replicate"], ctx.layout, pc, mp)
    apply_fsdp(model, _dp_mesh(ctx), ctx.layout, pc, mp)


def _expert_parallel(model: nn.Module, ctx: ParallelContext) -> list[nn.Module]:
    """parallel.ep: the family splits its experts over the ep ranks. Each rank's loss is scaled
    for FSDP2's average over all dp ranks, but an expert's gradient is averaged over the
    dp / ep ranks holding it only (it already sums the tokens of its ep group through the
    all-to-all): the extra 1/ep makes it the same average."""
    if not (ctx.distributed and ctx.layout.ep > 1):
        return []
    assert ctx.ep_mesh is not None
    split = family_of(model).expert_parallel
    assert split is not None  # layout.check_run refused the run otherwise
    return split(model, ctx.ep_mesh["ep"], 1.0 / ctx.layout.ep)


def parallelize_frozen(model: nn.Module, cfg: RunConfig, ctx: ParallelContext, rt: Runtime) -> nn.Module:
    """A frozen model that only runs forward passes (task=dpo's reference policy), in place:
    compiled blocks as the policy has, and under a sharded layout FSDP2 over the policy's mesh,
    so each rank holds 1/N of its weights. Data-parallel replicas (DDP) keep a plain copy: there
    are no gradients to reduce. No float8, AC or offload: nothing is saved for a backward."""
    if cfg.train.compile:
        _compile_blocks(model, cfg)
    if ctx.distributed and ctx.token_ranks > 1 and ctx.layout.sharded:
        _shard(model, cfg, ctx, rt)
    return model


def parallelize(model: nn.Module, cfg: RunConfig, ctx: ParallelContext, rt: Runtime) -> nn.Module:
    """Apply the configured parallelism to `model` in place and return it."""
    pc, layout = cfg.parallel, ctx.layout
    apply_float8(model, cfg, distributed=ctx.distributed and ctx.token_ranks > 1 and layout.sharded)
    if ctx.distributed and layout.tp > 1:
        assert ctx.mesh is not None
        apply_tp(model, ctx.mesh["tp"])
        # loss_parallel=false: the fused loss gathers the head weight instead.
        model.output._tunesmith_gather_weight = not pc.loss_parallel  # type: ignore[union-attr]
    experts = _expert_parallel(model, ctx)
    if ctx.distributed and layout.cp > 1:  # the objective splits each batch, attention rings
        assert ctx.mesh is not None
        apply_context_parallel(model, ctx.mesh["cp"])
    apply_tiled_mlp(model, pc.mlp_chunk_size)  # inside the block checkpoint that AC adds next
    n_ac = apply_activation_checkpointing(model, pc.activation_checkpointing, pc.ac_every)
    if pc.activation_offload:  # outside AC: the inputs AC keeps are what it offloads
        apply_activation_offload(model, rt.device)
    if cfg.train.compile:
        _compile_blocks(model, cfg)
    if ctx.distributed and ctx.token_ranks > 1:
        if layout.sharded:
            _shard(model, cfg, ctx, rt, experts)
        else:
            apply_ddp(model, ctx.token_mesh)
    if ctx.is_main and (ctx.distributed or n_ac):
        log.info("parallelize: %s; activation checkpointing %s on %d block(s)%s%s%s",
                 layout.describe(), pc.activation_checkpointing, n_ac,
                 f"; MLP in chunks of {pc.mlp_chunk_size} positions" if pc.mlp_chunk_size else "",
                 "; activation offload" if pc.activation_offload else "",
                 "; compiled blocks" if cfg.train.compile else "")
    return model
