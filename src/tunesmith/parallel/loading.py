"""Materialise a parallelised meta-device model: allocate each rank's shards, then fill them.

Large-model flow (no rank ever holds the full model):

    model = build_model(family, cfg, "meta")        # nothing allocated
    parallelize(model, ...)                          # TP / FSDP2 placements, still on meta
    materialize(model, ctx, rt, source=...)          # to_empty: only local shards allocated
      - pretrained: HF safetensors are memory-mapped and read one tensor at a time; each rank
        cuts its own shard out of the full tensor (`distribute_tensor(src_data_rank=None)`:
        no communication), copies it into its shard and drops the full tensor. Host memory per
        rank: its shards plus one full tensor; the files themselves sit once in the page cache
        of a node, shared by its ranks.
      - from scratch: on GPUs, the model's own `init_weights` runs on the sharded DTensors
        (DTensor's offset-based RNG gives every shard its slice of one random stream). On CPU
        meshes DTensor has no such RNG, so a full host copy is initialised and cut into shards
        instead (CPU runs are small), which also makes CPU runs match one process exactly.
        With CPU offload (host-resident shards) each distinct shard uses its own seeded stream.
        NF4 (QLoRA) weights cannot be drawn in place: a model holding them always takes the
        host-copy path, each full weight quantised and cut as FSDP2 cut it (parallel.quantized).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from tunesmith.hf import io as hfio
from tunesmith.models.io import build_model, plan_load, weights_dir
from tunesmith.models.llama.model import Llama
from tunesmith.models.registry import family_of
from tunesmith.parallel.dist import ParallelContext
from tunesmith.parallel.quantized import copy_full_into_quantized, is_quantized
from tunesmith.runtime import Runtime

log = logging.getLogger("tunesmith")


@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full (unsharded) value `full` into `param`, which may be a sharded DTensor.

    A plain target gets `full` cast to its dtype first (what `copy_` does anyway). An NF4
    (QLoRA) target, whole or an FSDP2 shard, quantises the whole bf16 value as one process
    would and keeps its own rows (`parallel.quantized`)."""
    if is_quantized(param):
        copy_full_into_quantized(param, full)
        return
    if not isinstance(param, DTensor):
        param.copy_(full.to(param.dtype))
        return
    # Every rank holds `full`, so each can cut its own piece without communication. The cut is
    # done on the mesh's device in the source dtype; the copy casts into the (fp32) shard.
    shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.to_local().copy_(shard.to_local())


def _allocate(model: nn.Module, ctx: ParallelContext, offload: bool) -> None:
    """to_empty on the right device. With CPU offload, params live on the host but buffers
    (RoPE frequencies) must be on the GPU where compute happens."""
    model.to_empty(device="cpu" if offload else ctx.device)
    if offload:
        for module in model.modules():
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[name] = buf.to(ctx.device)
    reset = getattr(model, "reset_rope", None)
    if callable(reset):
        reset()


def _shard_coordinate(ctx: ParallelContext) -> int:
    """This rank's position among the ranks holding *different* shards (dp_shard x cp x tp);
    ranks that are replicas of each other (dp_replicate) get the same number."""
    assert ctx.mesh is not None
    lay = ctx.layout
    return ((ctx.mesh.get_local_rank("dp_shard") * lay.cp + ctx.mesh.get_local_rank("cp")) * lay.tp
            + ctx.mesh.get_local_rank("tp"))


def _init_from_scratch(model: nn.Module, ctx: ParallelContext, rt: Runtime, family: Any,
                       model_cfg: Any, seed: int, offload: bool, skip: frozenset[str]) -> None:
    # NF4 weights (QLoRA) cannot be drawn in place: they take the reference-copy path below.
    quantized = any(is_quantized(p) for p in model.parameters())
    if ctx.mesh is None and not skip and not quantized:
        # One process, only the family's own tensors: its init in place, in the dtypes the
        # parameters already have (exactly `models.init_random`).
        model.init_weights(generator=torch.Generator(device=ctx.device).manual_seed(seed))  # type: ignore[operator]
        return
    if ctx.mesh is not None and ctx.device.type == "cuda" and not offload and not quantized:
        gen = torch.Generator(device=ctx.device).manual_seed(seed)
        model.init_weights(generator=gen)  # type: ignore[operator]
        return
    if offload and not quantized:
        # Shards live in host memory: DTensor's CUDA RNG does not cover them. Each distinct
        # shard draws from its own seeded CPU stream (replicas alike), so shards are independent
        # and replicas identical -- a valid init, though not the one-process values.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + _shard_coordinate(ctx))
        model.init_weights(generator=gen)  # type: ignore[operator]
        return
    # Transformed modules (LoRA / NF4 layers) are not what the family's init expects: a plain
    # reference model is initialised (one process: on its device, like `init_random`) and
    # copied into the transformed one, tensor by tensor.
    # Each reference tensor is drawn in the dtype its target holds (frozen bf16 base, fp32
    # trainables), exactly as if the family's init had run on the transformed model.
    ref_device = ctx.device if ctx.mesh is None else torch.device("cpu")
    ref = build_model(family, model_cfg, "meta")
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    for name, p in ref.named_parameters():
        p.data = p.data.to(dtypes.get(name, p.dtype))  # on meta: metadata only
    params = model.state_dict(keep_vars=True)
    gen = torch.Generator(device=ref_device).manual_seed(seed)
    if ctx.mesh is None and type(ref).init_weights is Llama.init_weights:
        _init_blockwise(ref, params, ref_device, gen)
        return
    ref.to_empty(device=ref_device)
    ref.init_weights(generator=gen)  # type: ignore[operator]
    for name, value in ref.state_dict().items():
        if name in params:
            copy_full_into(params[name], value)
    del ref


def _init_blockwise(ref: nn.Module, params: dict[str, torch.Tensor], device: torch.device,
                    gen: torch.Generator) -> None:
    """`Llama.init_weights` on the meta reference `ref`, one transformer block at a time: each
    block is allocated on `device` just before its `init_block`, copied into `params` (NF4
    targets quantise it there) and dropped again, so a QLoRA model from scratch never holds
    more than one dense block (Qwen3-30B-A3B: 1.3 GB in bf16, not the 61 GB model). The same
    init calls in the same order draw the same numbers as the whole-model init."""
    layers = ref.layers
    ref.layers = nn.ModuleList()  # type: ignore[assignment]
    ref.to_empty(device=device)  # embedding, final norm, head, RoPE buffers
    ref.layers = layers
    index = {id(layer): i for i, layer in enumerate(layers)}
    init_block = ref.init_block  # type: ignore[attr-defined]

    def one_block(layer: nn.Module, std: float, out_std: float, generator: torch.Generator | None) -> None:
        layer.to_empty(device=device)
        init_block(layer, std, out_std, generator)
        for name, value in layer.state_dict().items():
            key = f"layers.{index[id(layer)]}.{name}"
            if key in params:
                copy_full_into(params[key], value)
        layer.to_empty(device="meta")  # frees the dense block

    ref.init_block = one_block  # type: ignore[attr-defined]  # init_weights calls self.init_block
    ref.init_weights(generator=gen)  # type: ignore[operator]
    for name, value in ref.state_dict().items():
        if not name.startswith("layers.") and name in params:
            copy_full_into(params[name], value)


def _stream_pretrained(model: nn.Module, source: str, allow_pickle: bool,
                       skip: frozenset[str] = frozenset()) -> None:
    cfg = model.cfg  # type: ignore[attr-defined]
    adapter = family_of(model).adapter(cfg)
    files = hfio.find_weight_files(weights_dir(source))
    mapping = plan_load(model, files, allow_pickle, skip)  # names and shapes checked from headers
    params = model.state_dict(keep_vars=True)
    for hf_name, tensor in adapter.hf_view_tensors(hfio.iter_tensors(files, allow_pickle)):
        native = mapping.get(hf_name)
        if native is not None:  # HF layout -> ours (e.g. GPT-2's Conv1D [in, out] transposed)
            copy_full_into(params[native], adapter.tensor_to_native(hf_name, tensor))
        del tensor


def materialize(model: nn.Module, ctx: ParallelContext, rt: Runtime, *, family: Any, model_cfg: Any,
                source: str | None, seed: int, allow_pickle: bool = False, offload: bool = False,
                skip: frozenset[str] = frozenset()) -> None:
    """Allocate the (possibly sharded) meta model and fill it from `source` or a seeded init.

    Call after `parallelize`. The model must already be in its parameter dtype (cast on meta).
    `skip`: tensors the base checkpoint does not hold (LoRA adapters); the caller fills them.
    """
    _allocate(model, ctx, offload)
    if source is not None:
        _stream_pretrained(model, source, allow_pickle, skip)
    else:
        _init_from_scratch(model, ctx, rt, family, model_cfg, seed, offload, skip)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
