"""Activation checkpointing per transformer block, applied from outside the model.

Each checkpointed block keeps only its input [B, T, D] for backward and recomputes its
internals there (~1/3 more compute for a large cut in activation memory). Non-reentrant
`torch.utils.checkpoint`: works with frozen inputs (LoRA), keyword arguments and
torch.compile, and restores RNG so dropout masks are identical in the recomputation.

The block's `forward` is wrapped on the instance, so module paths and state-dict keys do not
change (unlike wrapper modules, which add a prefix). Apply before compiling the blocks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunesmith.errors import TunesmithError

_MARK = "_tunesmith_checkpointed"


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        # Nothing is saved for backward without grad (eval, generation with a KV cache).
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", every: int = 1) -> int:
    """Checkpoint transformer blocks of `model.layers`.

    mode: "none" (no-op) or "full" (whole blocks); `every`=k checkpoints blocks 0, k, 2k, ...
    (k > 1 trades some of the memory saving back for speed). Returns the number of blocks
    checkpointed. Idempotent: a block already checkpointed is left as it is.
    """
    if mode == "none":
        return 0
    if mode != "full":
        raise TunesmithError(f"activation checkpointing mode must be 'none' or 'full', got {mode!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise TunesmithError(f"activation checkpointing `every` must be a positive integer, got {every!r}")
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TunesmithError(f"{type(model).__name__} has no `layers` list of blocks to checkpoint")
    n = 0
    for i, block in enumerate(layers):
        if i % every or getattr(block, _MARK, False):
            continue
        block.forward = _checkpointed(block.forward)  # instance attribute shadows the method
        setattr(block, _MARK, True)
        n += 1
    return n
