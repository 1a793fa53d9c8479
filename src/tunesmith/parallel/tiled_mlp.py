"""Sequence-tiled MLP (`parallel.mlp_chunk_size`): each block's position-wise MLP runs over
chunks of the sequence, each chunk under its own activation checkpoint.

Why: at long sequence lengths the MLP's intermediates dominate a block's working set. For the
Llama-3-8B shape (SwiGLU, ffn 14336) the gate, up, activation and product tensors are
4 x 14336 bf16 values = 112 KiB per token, against 8 KiB for the block's input; under full
activation checkpointing + offload they are what still grows with T on the device during a
block's recompute and backward. The MLP treats every position independently, so cutting the
sequence into chunks changes no result: chunk outputs are concatenated (same values, same
gradients up to summation order of the weight gradients, which add chunk by chunk).

Cost: one more MLP forward per chunk in backward (the checkpoint's recompute). Worth it only
when activations, not compute, limit the sequence length; off by default.

Order in the assembly: after PEFT and float8 (they replace the MLP's linear layers, which the
tiled forward calls unchanged), before activation checkpointing (the block checkpoint then
wraps the tiled MLP; nested non-reentrant checkpoints are supported), offload and compile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunesmith.errors import TunesmithError
from tunesmith.models.registry import families

_MARK = "_tunesmith_tiled_mlp"


def tiled(forward: Callable[[torch.Tensor], torch.Tensor], chunk: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`forward` (x [B, T, D] -> [B, T, D], position-wise) over chunks of `chunk` positions."""

    @functools.wraps(forward)
    def run(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or x.shape[1] <= chunk:
            return forward(x)  # nothing to save (eval) or one chunk anyway
        pieces = [checkpoint(forward, piece, use_reentrant=False) for piece in x.split(chunk, dim=1)]
        return torch.cat(pieces, dim=1)  # [B, T, D]

    return run


def native_only(what: str) -> TunesmithError:
    """The one refusal for a model the tiled MLP cannot reach (run checks and this transform)."""
    types = ", ".join(sorted(t for t, fam in families().items() if fam.shardable))
    return TunesmithError(f"parallel.mlp_chunk_size needs a natively implemented family ({types}); {what}")


def apply_tiled_mlp(model: nn.Module, chunk: int | None) -> int:
    """Tile every block's `feed_forward` (the native families' MLP); returns the blocks tiled."""
    if not chunk:
        return 0
    blocks = getattr(model, "layers", None)
    if blocks is None or not all(hasattr(b, "feed_forward") for b in blocks):
        raise native_only("this model's blocks have no feed_forward MLP")
    for block in blocks:
        ff = block.feed_forward
        if not getattr(ff, _MARK, False):
            ff.forward = tiled(ff.forward, chunk)  # instance attribute: state-dict keys unchanged
            setattr(ff, _MARK, True)
    return len(blocks)
