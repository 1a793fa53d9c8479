"""HF-format export of a sharded (FSDP2 / TP) model at the end of a distributed run.

Tensors are gathered one at a time (`DTensor.full_tensor()`: an all-gather every rank joins, in
the same order) and moved to rank 0's host memory, which writes the safetensors files shard by
shard. No GPU ever holds more than its shards plus one full tensor, and rank 0's host holds at
most one output file's worth (`max_shard_size_bytes`). The other ranks only join the gathers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from tunesmith.hf import io as hfio
from tunesmith.models.io import DEFAULT_SHARD_BYTES, as_dtype, write_hf_dir


def _full_cpu(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    full = t.full_tensor() if isinstance(t, DTensor) else t
    return full.detach().to("cpu", dtype or full.dtype).contiguous()


@torch.no_grad()
def save_pretrained_distributed(
    model: nn.Module,
    family: Any,
    cfg: Any,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    max_shard_size_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Collective: every rank calls it; rank 0 writes `out_dir` through `write_hf_dir`."""
    adapter = family.adapter(cfg)
    target = as_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}  # hf name -> (sharded) native tensor
    native_of: dict[str, str] = {}
    for name, t in model.state_dict().items():
        hf_name = adapter.native_key_to_hf(name)
        if hf_name is not None:
            tensors[hf_name], native_of[hf_name] = t, name
    names = list(tensors)

    def gathered(n: str) -> torch.Tensor:
        # Gather first: a layout change (GPT-2's transpose) needs the whole tensor.
        return adapter.tensor_to_hf(native_of[n], _full_cpu(tensors[n], target))

    def nbytes(name: str) -> int:
        t = tensors[name]
        return t.numel() * (target or t.dtype).itemsize

    rank0 = dist.get_rank() == 0
    if not rank0:
        # Join every gather in rank 0's order (the same shard plan), keep nothing.
        for shard in hfio.plan_shards([(n, nbytes(n)) for n in names], max_shard_size_bytes):
            for n in shard:
                gathered(n)
        dist.barrier()
        return Path(out_dir)
    saved_dtype = target or next(iter(tensors.values())).dtype
    write_hf_dir(out_dir, cfg, names, lambda n: gathered(n).contiguous(), nbytes,
                 saved_dtype=saved_dtype, tokenizer=tokenizer, max_shard_size_bytes=max_shard_size_bytes)
    dist.barrier()
    return Path(out_dir)
