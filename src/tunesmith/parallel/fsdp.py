"""Data parallelism: FSDP2 (`fully_shard`) for the sharded strategies, DDP for no_shard.

FSDP2 units, innermost first:
    each transformer block          (its own all-gather / reduce-scatter, prefetched)
    tok_embeddings                  (only when untied: a tied matrix must live in one unit)
    the root (the whole model)      norm + output head (+ the tied embedding)

The root keeps its parameters gathered from forward through backward (FSDP2 does not reshard
the root after forward), which is what lets the fused loss read `model.output.weight` after the
model's forward; `gathered_head_weight` makes that explicit.

Precision: parameters stay fp32 and sharded (the optimizer's master weights); with bf16 the
all-gathered copies used for compute are bf16 and gradients are reduced in `reduce_dtype`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from tunesmith.config.schema import ParallelConfig
from tunesmith.parallel.layout import Layout
from tunesmith.parallel.quantized import is_quantized

_REDUCE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def mp_policy(compute_dtype: torch.dtype, param_dtype: torch.dtype, reduce: str) -> MixedPrecisionPolicy:
    """bf16 compute on fp32 master weights: gather in bf16, reduce in `reduce` (fp32 default)."""
    if compute_dtype == param_dtype:
        return MixedPrecisionPolicy()  # fp32 or pure-bf16 runs: nothing to cast
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=_REDUCE[reduce])


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.layers)  # type: ignore[attr-defined]


def _tied(model: nn.Module) -> bool:
    emb = getattr(model, "tok_embeddings", None)
    out = getattr(model, "output", None)
    return emb is not None and out is not None and emb.weight is out.weight


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    layout: Layout,
    pc: ParallelConfig,
    mp: MixedPrecisionPolicy,
) -> None:
    """Shard `model` in place over `dp_mesh` (1-D for FSDP, 2-D (replicate, shard) for HSDP)."""
    offload: OffloadPolicy = CPUOffloadPolicy() if pc.cpu_offload else OffloadPolicy()
    reshard = layout.strategy != "shard_grad_op"
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        # The last block's params are needed again right away by backward: never reshard them.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard and i < len(blocks) - 1)
    if not _tied(model):
        fully_shard(model.tok_embeddings, mesh=dp_mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard)
    # Root: default reshard_after_forward, so FSDP2 keeps the head gathered for the loss.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, offload_policy=offload)
    _set_prefetch(blocks, pc.forward_prefetch, pc.backward_prefetch)


def apply_fsdp_experts(experts: list[nn.Module], mesh: DeviceMesh, layout: Layout,
                       pc: ParallelConfig, mp: MixedPrecisionPolicy) -> None:
    """Expert-parallel experts (DTensors Shard(0) on the ep mesh): an FSDP2 unit each over
    `mesh`, the ranks of the other expert groups (the same experts, other tokens), before the
    blocks are wrapped so the blocks' units leave them out. Their inputs keep their dtypes
    (fp32 routing weights stay fp32): the block's unit has cast what it casts."""
    offload: OffloadPolicy = CPUOffloadPolicy() if pc.cpu_offload else OffloadPolicy()
    mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype,
                              cast_forward_inputs=False)
    for module in experts:
        fully_shard(module, mesh=mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=layout.strategy != "shard_grad_op")


def _set_prefetch(blocks: list[nn.Module], forward: int, backward: int) -> None:
    """Explicit prefetch: block i all-gathers blocks i+1..i+k in forward, i-1..i-k in backward."""
    for i, block in enumerate(blocks):
        assert isinstance(block, FSDPModule)
        if forward > 0:
            block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + forward])
        nxt = blocks[max(0, i - backward) : i][::-1]
        block.set_modules_to_backward_prefetch(nxt if backward > 0 else [])


class _QuantizedParams(nn.Module):
    """Stands for `model`'s NF4 (QLoRA) weights in replicate()'s `ignored_modules`, which
    collects their parameters at DDP's lazy init (first forward, after materialisation).

    DDP would broadcast them from rank 0 at init, which an NF4 tensor does not support; they
    need no sync: frozen, and quantised from the same file on every rank."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._owner = [model]  # a list, so the model is not registered as a child

    def parameters(self, recurse: bool = True):  # nn.Module's signature; always all of them
        return iter([p for p in self._owner[0].parameters() if is_quantized(p)])


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """no_shard: classic DDP (bucketed all-reduce overlapped with backward) via `replicate`."""
    from torch.distributed._composable.replicate import replicate

    # The flattened dp mesh's group, not the mesh: replicate() treats a sliced mesh as DDP+TP
    # and adds DTensor hooks a plain replicated model does not need.
    kwargs: dict = {"process_group": dp_mesh.get_group()}
    if dp_mesh.device_type == "cuda":
        kwargs["device_ids"] = [torch.cuda.current_device()]
    replicate(model, ignored_modules=[_QuantizedParams(model)], **kwargs)


def gathered_head_weight(model: nn.Module) -> torch.Tensor:
    """`model.output.weight` as computation may use it: FSDP-gathered (a plain tensor, or a
    TP DTensor under 2-D). Call between the model's forward and backward."""
    head = model.output  # type: ignore[attr-defined]
    owner = head if isinstance(head, FSDPModule) else model
    if isinstance(owner, FSDPModule):
        # A no-op when already gathered (the root is not resharded after forward); otherwise
        # it gathers, and the root's post-backward reduce-scatters the gradient and reshards.
        owner.unshard()
    weight = head.weight
    if getattr(head, "_tunesmith_gather_weight", False) and isinstance(weight, DTensor):
        # parallel.loss_parallel=false: the whole [V, D] head on every TP rank.
        return weight.full_tensor()
    return weight
