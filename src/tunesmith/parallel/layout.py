"""Parallel layout: resolve the mesh degrees of a `ParallelConfig` for a world size, and check
them against the run (strategy options, model shape, data) before any process group exists.

The device mesh is 4-D, outermost first: (dp_replicate, dp_shard, cp, tp). Ranks that differ
only in their tp coordinate form one tensor-parallel group (placed innermost so a TP group stays
inside a node, where the links are fastest), and see the same data; so do the ranks of one
context-parallel (cp) group, which split each sequence between them. The data-parallel world is
dp_replicate x dp_shard; FSDP2 shards parameters over dp_shard x cp (as torchtitan does), since
the cp ranks need the same weights. Strategy -> degrees (cp and tp are given, the rest fill):

    full_shard / shard_grad_op   dp_replicate = 1, dp_shard fills
    no_shard (DDP)               dp_shard = 1, dp_replicate fills
    hybrid_shard (HSDP)          dp_shard = ranks per node / tp, dp_replicate fills (= nodes)
    auto                         hybrid_shard if dp_replicate > 1 was given, else full_shard

Everything here is pure arithmetic on the config, so `tunesmith launch` can reject a bad layout
before starting a single worker, and each worker before touching a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tunesmith.config.schema import ParallelConfig, RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.models.registry import adaption_point, families, get_family
from tunesmith.parallel.tiled_mlp import native_only

SHARDED = ("full_shard", "shard_grad_op", "hybrid_shard")


@dataclass(frozen=True)
class Layout:
    """Resolved degrees; `dp_replicate * dp_shard * tp == world_size`."""

    strategy: str  # full_shard | shard_grad_op | no_shard | hybrid_shard
    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    cp: int = 1  # context-parallel degree (the sequence split over cp ranks)
    ep: int = 1  # expert-parallel degree (experts split over groups of ep data-parallel ranks)

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches one step sees."""
        return self.dp_replicate * self.dp_shard

    @property
    def sharded(self) -> bool:
        """True when FSDP2 manages the parameters (every strategy but no_shard)."""
        return self.strategy in SHARDED

    @property
    def fsdp_shard(self) -> int:
        """Ranks each FSDP2 parameter is sharded over: dp_shard x cp."""
        return self.dp_shard * self.cp

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        return (self.dp_replicate, self.dp_shard, self.cp, self.tp)

    def describe(self) -> str:
        cp = f" x cp={self.cp}" if self.cp > 1 else ""
        ep = f"; experts split over ep={self.ep} ranks" if self.ep > 1 else ""
        return (f"{self.strategy} on {self.world_size} rank(s): dp_replicate={self.dp_replicate} "
                f"x dp_shard={self.dp_shard}{cp} x tp={self.tp}{ep}")


def env_world() -> tuple[int, int]:
    """(world size, ranks per node) from the torchrun/Slurm-style environment; (1, 1) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return world, local


def _fill(value: int, other: int, tp: int, world: int, name: str) -> int:
    if value != -1:
        return value
    if world % (other * tp):
        raise TunesmithError(
            f"cannot fill parallel.{name}: world size {world} is not divisible by "
            f"{'dp_replicate' if name == 'dp_shard' else 'dp_shard'}={other} x tp={tp}"
        )
    return world // (other * tp)


def _strategy_degrees(pc: ParallelConfig, world: int, local_world: int) -> tuple[str, int, int]:
    """(strategy, dp_replicate, dp_shard) with -1s resolved according to the strategy; `tp` in
    the arithmetic is tp x cp (both are given, the data-parallel degrees fill the rest)."""
    strategy, rep, shard, tp = pc.strategy, pc.dp_replicate, pc.dp_shard, pc.tp * pc.cp
    if strategy == "auto":
        strategy = "hybrid_shard" if rep > 1 else "full_shard"
    if strategy in ("full_shard", "shard_grad_op"):
        if rep > 1:
            raise TunesmithError(
                f"parallel.strategy={strategy} shards over every data-parallel rank; "
                f"dp_replicate={rep} needs strategy=hybrid_shard (or no_shard for plain DDP)"
            )
        return strategy, 1, _fill(shard, 1, tp, world, "dp_shard")
    if strategy == "no_shard":
        if shard > 1:
            raise TunesmithError(
                f"parallel.strategy=no_shard replicates every parameter; dp_shard={shard} needs a "
                "sharded strategy (full_shard, shard_grad_op or hybrid_shard)"
            )
        return strategy, _fill(rep, 1, tp, world, "dp_replicate"), 1
    # hybrid_shard: shard inside a node by default, replicate across nodes.
    if shard == -1 and rep == -1:
        if local_world % tp:
            raise TunesmithError(
                f"parallel.tp={tp} does not divide the {local_world} ranks per node; "
                "tensor-parallel groups must stay within a node"
            )
        shard = local_world // tp
    if shard == -1:
        shard = _fill(shard, rep, tp, world, "dp_shard")
    return strategy, _fill(rep, shard, tp, world, "dp_replicate"), shard


def resolve_layout(pc: ParallelConfig, world_size: int, local_world_size: int | None = None) -> Layout:
    """Degrees for `world_size` ranks; a TunesmithError says exactly what does not fit."""
    if world_size < 1:
        raise TunesmithError(f"world size must be >= 1, got {world_size}")
    local = local_world_size or world_size
    if world_size % pc.tp:
        raise TunesmithError(f"parallel.tp={pc.tp} does not divide the world size {world_size}")
    if world_size % (pc.cp * pc.tp):
        raise TunesmithError(
            f"parallel.cp={pc.cp} (x tp={pc.tp}) does not divide the world size {world_size}; "
            "the ranks must form whole context-parallel groups"
        )
    strategy, rep, shard = _strategy_degrees(pc, world_size, local)
    if rep * shard * pc.cp * pc.tp != world_size:
        cp = f" x cp={pc.cp}" if pc.cp > 1 else ""
        raise TunesmithError(
            f"parallel degrees dp_replicate={rep} x dp_shard={shard}{cp} x tp={pc.tp} = "
            f"{rep * shard * pc.cp * pc.tp} do not match the world size {world_size} "
            "(nnodes x nproc-per-node); set one degree to -1 to fill"
        )
    if pc.tp > 1 and local % pc.tp:
        raise TunesmithError(
            f"parallel.tp={pc.tp} does not divide the {local} ranks per node; "
            "tensor-parallel groups must stay within a node"
        )
    if strategy == "no_shard" and pc.tp > 1:
        raise TunesmithError(
            "parallel.strategy=no_shard (DDP) cannot be combined with tp > 1; use "
            "strategy=hybrid_shard with dp_shard=1, which replicates the TP shards"
        )
    if pc.cpu_offload and strategy not in SHARDED:
        raise TunesmithError("parallel.cpu_offload needs a sharded strategy (FSDP2), not no_shard")
    _check_ep(pc, strategy, rep * shard)
    return Layout(strategy, rep, shard, pc.tp, world_size, pc.cp, pc.ep)


def _check_ep(pc: ParallelConfig, strategy: str, dp: int) -> None:
    """parallel.ep > 1: groups of ep data-parallel ranks under FSDP2 (one dp_shard dimension)."""
    ep = pc.ep
    if ep == 1:
        return
    if pc.tp > 1 or pc.cp > 1:
        raise TunesmithError(f"parallel.ep={ep} composes with FSDP2 only, not yet with tensor or "
                             f"context parallelism (tp={pc.tp}, cp={pc.cp}); set both to 1")
    if strategy not in ("full_shard", "shard_grad_op"):
        raise TunesmithError(f"parallel.ep={ep} needs parallel.strategy full_shard or shard_grad_op "
                             f"(FSDP2 over every data-parallel rank), not {strategy}")
    if dp % ep:
        raise TunesmithError(f"parallel.ep={ep} must divide the data-parallel degree {dp} "
                             "(expert groups of ep ranks each)")


def _tp_support() -> tuple[str, str]:
    """("Gemma / Llama / MoE", "gemma3, ..."): the families declaring a tensor-parallel plan and
    the HF model types they serve, for the error message."""
    fams = {t: fam for t, fam in families().items() if fam.tp_plan is not None}
    names = sorted({"MoE" if fam.name == "moe" else fam.name.capitalize() for fam in fams.values()})
    return " / ".join(names), ", ".join(sorted(fams))


def _check_single_process_features(cfg: RunConfig, model_cfg: Any) -> None:
    """Features not (yet) built for several processes: refused up front, not half-working."""
    unsupported = []
    pc = cfg.peft
    if pc.method not in ("none", "qlora") and pc.base_dtype == "float8":
        unsupported.append("peft.base_dtype=float8")
    if pc.method != "none" and pc.save_merged:
        unsupported.append("peft.save_merged (merge the saved adapter with `tunesmith merge`)")
    if cfg.data.streaming:
        unsupported.append("data.streaming")
    if cfg.eval.generate.enabled:
        unsupported.append("eval.generate")
    if not get_family(model_cfg.model_type).shardable:
        unsupported.append(f"the generic HF model type {model_cfg.model_type!r}")
    if unsupported:
        raise TunesmithError(
            f"{', '.join(unsupported)} run on one process only for now; launch with one "
            "process or turn them off"
        )


def _cp_support() -> str:
    """"llama, mistral, qwen2": the HF model types whose family has ring attention (for errors)."""
    return ", ".join(sorted(t for t, fam in families().items() if fam.context_parallel))


def _check_context_parallel(cfg: RunConfig, layout: Layout, model_cfg: Any) -> None:
    """parallel.cp > 1: what ring attention serves (causal decoders, packed or document-masked
    rows), and a sequence that splits into 2 x cp equal chunks."""
    cp = layout.cp
    if layout.tp > 1:
        raise TunesmithError(f"parallel.cp={cp} with parallel.tp={layout.tp}: context parallelism "
                             "composes with data parallelism (FSDP2, HSDP, DDP), not yet with tensor "
                             "parallelism; use parallel.tp=1")
    family = get_family(model_cfg.model_type)
    if not family.context_parallel or family.kind != "causal":
        raise TunesmithError(f"parallel.cp={cp}: context parallelism has ring attention for the "
                             f"{_cp_support()} model types only, not {model_cfg.model_type!r}; use parallel.cp=1")
    if cfg.task == "clm" and cfg.data.mode != "packed":
        raise TunesmithError(f"parallel.cp={cp} needs packed sequences (data.mode=packed); "
                             "data.mode=lines pads each batch to a length the ranks cannot split evenly")
    if cfg.task == "sft" and not cfg.sft.packing:
        raise TunesmithError(f"parallel.cp={cp} with task=sft needs sft.packing=true "
                             "(document-masked rows); unpacked padded batches are not split over ranks")
    if cfg.data.block_size % (2 * cp):
        raise TunesmithError(
            f"parallel.cp={cp} cuts each sequence into 2 x cp = {2 * cp} equal chunks (rank i holds "
            f"chunks i and {2 * cp - 1}-i); data.block_size={cfg.data.block_size} is not a multiple of {2 * cp}"
        )


def _check_expert_parallel(layout: Layout, model_cfg: Any) -> None:
    """parallel.ep > 1: a family with expert parallelism, whole experts per rank."""
    ep = layout.ep
    if get_family(model_cfg.model_type).expert_parallel is None:
        raise TunesmithError(f"parallel.ep={ep}: model type {model_cfg.model_type!r} has no experts "
                             "(MoE models: mixtral, qwen3_moe); use parallel.ep=1")
    if model_cfg.num_experts % ep:
        raise TunesmithError(f"parallel.ep={ep} must divide the model's num_experts="
                             f"{model_cfg.num_experts} (whole experts per rank)")


def _check_tiled_mlp(cfg: RunConfig, model_cfg: Any) -> None:
    """parallel.mlp_chunk_size tiles the native families' `feed_forward`: the generic transformers
    wrapper (not shardable) has none."""
    if cfg.parallel.mlp_chunk_size and not get_family(model_cfg.model_type).shardable:
        raise native_only(f"not model type {model_cfg.model_type!r}")


def _check_router_aux(cfg: RunConfig, model_cfg: Any) -> None:
    """train.router_aux_loss_coef needs routers, and each sparse layer's routing of the whole
    micro-batch (a tiled MLP routes it chunk by chunk)."""
    if cfg.train.router_aux_loss_coef is None:
        return
    if not hasattr(model_cfg, "num_experts"):
        raise TunesmithError(f"train.router_aux_loss_coef: model type {model_cfg.model_type!r} has no "
                             "experts (MoE models: mixtral, qwen3_moe); leave it null")
    if cfg.parallel.mlp_chunk_size:
        raise TunesmithError("train.router_aux_loss_coef with parallel.mlp_chunk_size is not supported "
                             "(the tiled MLP routes each chunk apart); drop one of them")


def _check_tp_lengths(cfg: RunConfig, tp: int) -> None:
    """Sequence parallelism splits [B, T, D] into tp equal [B, T/tp, D] slices. Unpacked SFT and
    DPO batches are padded to a multiple of tp whatever their length (data.assembly.pad_multiple),
    so only fixed lengths are checked: packed blocks (data.block_size) and CLM lines mode's
    padding (data.pad_to_multiple_of)."""
    if cfg.task in ("sft", "dpo") and not cfg.sft.packing:
        return
    packed = cfg.data.mode == "packed" or cfg.task == "sft"  # sft.packing fills block_size rows
    block = cfg.data.block_size if packed else cfg.data.pad_to_multiple_of
    if block is None or block % tp:
        what = "data.block_size" if packed else "data.pad_to_multiple_of (lines mode)"
        raise TunesmithError(
            f"parallel.tp={tp} splits the sequence over the TP ranks (sequence parallel): "
            f"{what}={block} must be a multiple of {tp}"
        )


def check_run(cfg: RunConfig, layout: Layout, model_cfg: Any, device_type: str) -> None:
    """Checks that need the model shape, the data settings or the device (still no comms)."""
    tp = layout.tp
    _check_tiled_mlp(cfg, model_cfg)
    _check_router_aux(cfg, model_cfg)
    if layout.world_size > 1:
        _check_single_process_features(cfg, model_cfg)
    if layout.cp > 1:
        _check_context_parallel(cfg, layout, model_cfg)
    if layout.ep > 1:
        _check_expert_parallel(layout, model_cfg)
    pc = cfg.peft
    if tp > 1 and pc.method == "qlora":
        raise TunesmithError(
            f"parallel.tp={tp}: QLoRA's NF4 base weights shard with FSDP2/HSDP/DDP only, not with "
            "tensor parallelism; use parallel.tp=1"
        )
    if layout.ep > 1 and pc.method == "qlora":
        raise TunesmithError(
            f"parallel.ep={layout.ep}: QLoRA's NF4 experts shard with FSDP2/HSDP/DDP only, not with "
            "expert parallelism; use parallel.ep=1"
        )
    if pc.method == "llama_adapter":
        adaption_point(model_cfg.model_type)  # one line for a model type without one
        if not pc.from_checkpoint and pc.adapter_layers > model_cfg.n_layers:
            raise TunesmithError(f"peft.adapter_layers={pc.adapter_layers} exceeds the model's "
                                 f"{model_cfg.n_layers} transformer blocks")
    if tp > 1 and pc.method in ("dora", "llama_adapter"):
        # DoRA's row norms ||W + s B A|| need whole rows of W (rowwise TP splits them), and the
        # adaption prompts attach to attention as a whole; LoRA and freezing shard with TP.
        raise TunesmithError(
            f"parallel.tp={tp}: peft.method={pc.method} composes with data parallelism (FSDP2, "
            "HSDP, DDP) but not yet with tensor parallelism; use peft.method=lora or parallel.tp=1"
        )
    if tp > 1 and get_family(model_cfg.model_type).tp_plan is None:
        names, types = _tp_support()
        raise TunesmithError(
            f"parallel.tp={tp}: tensor parallelism has a plan for the {names} family only "
            f"({types}), not {model_cfg.model_type!r}; use parallel.tp=1"
        )
    if tp > 1:
        experts = ("num_experts",) if hasattr(model_cfg, "num_experts") else ()
        for name in ("n_heads", "n_kv_heads", "intermediate_size", *experts):
            value = int(getattr(model_cfg, name))
            if value % tp:
                raise TunesmithError(
                    f"parallel.tp={tp} must divide the model's {name}={value} "
                    "(each tensor-parallel rank holds whole heads / equal MLP slices / whole experts)"
                )
        _check_tp_lengths(cfg, tp)
    precision = cfg.train.precision
    distributed = layout.world_size > 1
    if distributed and precision == "fp16" and device_type == "cuda":
        raise TunesmithError(
            "train.precision=fp16 is not supported across ranks (its loss scaler does not handle "
            "sharded gradients); use bf16"
        )
    if layout.world_size > 1 and cfg.parallel.cpu_offload and device_type != "cuda":
        raise TunesmithError("parallel.cpu_offload moves GPU memory to the host; it needs CUDA")
