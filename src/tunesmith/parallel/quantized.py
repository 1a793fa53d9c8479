"""Quantized (NF4) base weights sharded by FSDP2: fill each rank's shard exactly as one process
would quantise the whole weight.

QLoRA stores block linear weights as torchao `NF4Tensor`s. FSDP2 shards them like any other
parameter: `torch.chunk(weight, shards, dim=0)` splits the NF4 storage (4-bit codes
[numel/2] uint8, per-64-element scales [numel/64] int8, per-16384-element factors fp32) into
contiguous row blocks, and `NF4Tensor.fsdp_pre_all_gather / fsdp_post_all_gather` all-gather
only that storage per block before forward (and again in backward), so each rank holds 1/N of
the quantised bytes and the dense bf16 weight exists only inside one matmul
(`tunesmith::nf4_linear`).

Quantising each rank's rows on its own would not give one process's values: the double
quantisation subtracts one mean taken over the *whole* weight's scales. So the full weight is
quantised on every rank (the same input gives the same bits everywhere), cut with the same
`torch.chunk` FSDP2 used, and this rank's piece of each storage tensor is copied into its
shard. Host memory: one full weight plus its NF4 copy at a time.

This module does not import torchao: a quantized shard is recognised by its storage
attributes, and re-quantised with its own class's `from_tensor` and block sizes.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

# The storage of an NF4Tensor (its __tensor_flatten__ names); the first three are split by
# chunk(dim=0), the mean and the 16-entry code table are whole-tensor values every shard keeps.
_SHARDED = ("quantized_data", "quantized_scalers", "quantization_factor")
_WHOLE = ("scaler_mean", "nf4")


def _local(param: torch.Tensor) -> torch.Tensor:
    """The tensor holding this rank's values: a DTensor's local shard, else the tensor itself."""
    # Not `.data`: for a tensor subclass that is a new wrapper object, and the whole-tensor
    # values set below must land on the object the module really holds.
    return param._local_tensor if isinstance(param, DTensor) else param


def is_quantized(param: torch.Tensor) -> bool:
    """True for an NF4 weight, whole (one process, DDP) or an FSDP2 shard (DTensor)."""
    return type(_local(param)).__name__ == "NF4Tensor"


def _shard_index(param: DTensor) -> tuple[int, int]:
    """(this rank's chunk index, chunk count) for FSDP's row sharding: Shard(0) on one mesh
    dimension (FSDP2), Replicate on the others (HSDP's replicate dimension)."""
    mesh = param.device_mesh
    index, count = 0, 1
    for dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard) and placement.dim == 0 and count == 1:
            index, count = mesh.get_local_rank(dim), mesh.size(dim)
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(f"NF4 weights shard by rows only (FSDP2), not {param.placements}")
    return index, count


@torch.no_grad()
def copy_full_into_quantized(param: torch.Tensor, full: torch.Tensor) -> None:
    """Quantise `full` [out, in] as one process would and copy this rank's rows of the NF4
    storage into `param` (an NF4 tensor, or a DTensor over an NF4 shard). A stacked MoE expert
    weight [E, out, in] is stored as [E*out, in] (peft.quant_experts): `full` is viewed so."""
    local = _local(param)
    if full.dim() != param.dim():
        full = full.reshape(tuple(param.shape))
    index, count = _shard_index(param) if isinstance(param, DTensor) else (0, 1)
    device = local.quantized_data.device
    # The same dtype cast as the one-process path (quant.to_nf4: weight in bf16, then NF4).
    whole = type(local).from_tensor(full.detach().to(device=device, dtype=local.dtype),
                                    local.block_size, local.scaler_block_size)
    piece = torch.chunk(whole, count, dim=0)[index] if count > 1 else whole
    if tuple(piece.shape) != tuple(local.shape):
        raise RuntimeError(f"NF4 shard shape {tuple(piece.shape)} does not match the parameter's {tuple(local.shape)}")
    for name in _SHARDED:  # into the storage allocated by to_empty (FSDP2 all-gathers from it)
        getattr(local, name).copy_(getattr(piece, name))
    # to_empty leaves the whole-tensor values on the meta device: set them.
    for name in _WHOLE:
        setattr(local, name, getattr(piece, name).to(device).clone())
