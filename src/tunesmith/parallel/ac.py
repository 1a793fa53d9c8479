"""Activation checkpointing for transformer blocks: none, full, selective; every k-th block.

full       the block keeps only its input; everything inside is recomputed in backward.
selective  per-op policy (torch.utils.checkpoint.create_selective_checkpoint_contexts): outputs
           of matmuls, attention kernels and TP collectives are saved, cheap elementwise ops
           and norms are recomputed. Most of full AC's memory saving at a fraction of its
           recompute cost.

Applied by replacing the block's `forward` with a checkpointed call of the original, so module
names and state-dict keys do not change (no wrapper module), and hooks that other layers put on
the block (FSDP2's unshard/reshard, TP's input redistribution) stay outside the checkpointed
region, as they must. Order: TP -> AC -> compile -> FSDP2 (tunesmith.parallel.apply).
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


def _save_list() -> set[Any]:
    """Ops whose outputs selective AC keeps (expensive to recompute, cheap to store)."""
    aten = torch.ops.aten
    ops: set[Any] = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        op = getattr(aten, name, None)
        if op is not None:
            ops.add(op.default)
    # TP's reduce-scatter: recomputing it would repeat the communication.
    c10d = getattr(torch.ops, "_c10d_functional", None)
    if c10d is not None and hasattr(c10d, "reduce_scatter_tensor"):
        ops.add(c10d.reduce_scatter_tensor.default)
    return ops


def selective_context_fn() -> Callable[[], tuple[Any, Any]]:
    save = _save_list()

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def checkpoint_module(module: nn.Module, mode: str) -> None:
    """Make `module.forward` activation-checkpointed in place (mode: full | selective)."""
    if getattr(module, "_tunesmith_ac", None):
        return  # applied once: a second wrap would recompute twice
    original = module.forward
    kwargs: dict[str, Any] = {"use_reentrant": False, "preserve_rng_state": False}
    if mode == "selective":
        kwargs["context_fn"] = selective_context_fn()

    @functools.wraps(original)
    def forward(*args: Any, **kw: Any) -> Any:
        return checkpoint(original, *args, **kw, **kwargs)

    module.forward = forward  # type: ignore[method-assign]
    module._tunesmith_ac = mode  # type: ignore[assignment]


def apply_ac(model: nn.Module, mode: str, every: int = 1) -> int:
    """Checkpoint every `every`-th block of `model.layers` (blocks 0, k, 2k, ...); returns the count."""
    if mode not in MODES:
        raise TunesmithError(f"activation checkpointing mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return 0
    if every < 1:
        raise TunesmithError(f"activation checkpointing every={every} must be >= 1")
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TunesmithError(f"{type(model).__name__} has no .layers to checkpoint")
    count = 0
    for i, block in enumerate(layers):
        if i % every == 0:
            checkpoint_module(block, mode)
            count += 1
    return count
