"""Activation checkpointing per transformer block, applied from outside the model.

Modes (`parallel.activation_checkpointing`, or `apply_activation_checkpointing` directly):

none       nothing saved differently.
full       each checkpointed block keeps only its input [B, T, D] for backward and recomputes
           its internals there (~1/3 more compute for a large cut in activation memory).
selective  per-op policy (torch.utils.checkpoint.create_selective_checkpoint_contexts): the
           outputs of matmuls, attention kernels and TP reduce-scatters are saved, cheap
           elementwise ops and norms are recomputed. Most of full AC's memory saving at a
           fraction of its recompute cost.

`every`=k checkpoints blocks 0, k, 2k, ... (k > 1 trades some of the saving back for speed).

Non-reentrant `torch.utils.checkpoint`: works with frozen inputs (LoRA), keyword arguments and
torch.compile, and restores the RNG state so dropout masks are identical in the recomputation.
Without grad (eval, generation with a KV cache) the block runs plainly: nothing to save.

The block's `forward` is wrapped on the instance, so module paths and state-dict keys do not
change (unlike wrapper modules, which add a prefix), and hooks that other layers put on the
block (FSDP2's unshard/reshard, TP's input redistribution) stay outside the recomputed region,
as they must. Order: TP -> AC -> compile -> FSDP2 (tunesmith.parallel.apply).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from tunesmith.errors import TunesmithError

MODES = ("none", "full", "selective")
_MARK = "_tunesmith_checkpointed"


def _save_list() -> set[Any]:
    """Ops whose outputs selective AC keeps (expensive to recompute, cheap to store)."""
    aten = torch.ops.aten
    ops: set[Any] = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_attention_math"):
        op = getattr(aten, name, None)
        if op is not None:
            ops.add(op.default)
    # TP's reduce-scatter: recomputing it would repeat the communication.
    c10d = getattr(torch.ops, "_c10d_functional", None)
    if c10d is not None and hasattr(c10d, "reduce_scatter_tensor"):
        ops.add(c10d.reduce_scatter_tensor.default)
    return ops


def selective_context_fn() -> Callable[[], tuple[Any, Any]]:
    """`context_fn` for torch.utils.checkpoint that saves the ops of `_save_list`."""
    save = _save_list()

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def _checkpointed(forward: Callable[..., Any], mode: str) -> Callable[..., Any]:
    options: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        options["context_fn"] = selective_context_fn()

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, **options, **kwargs)

    return run


def checkpoint_module(module: nn.Module, mode: str = "full") -> bool:
    """Checkpoint `module.forward` in place; False when it already was (applied once only)."""
    if getattr(module, _MARK, False):
        return False
    module.forward = _checkpointed(module.forward, mode)  # instance attribute shadows the method
    setattr(module, _MARK, mode)
    return True


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", every: int = 1) -> int:
    """Checkpoint transformer blocks of `model.layers`; returns how many were checkpointed.

    Idempotent: a block already checkpointed is left as it is.
    """
    if mode not in MODES:
        raise TunesmithError(f"activation checkpointing mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return 0
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise TunesmithError(f"activation checkpointing `every` must be a positive integer, got {every!r}")
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TunesmithError(f"{type(model).__name__} has no `layers` list of blocks to checkpoint")
    return sum(checkpoint_module(block, mode) for i, block in enumerate(layers) if i % every == 0)
