"""The one forward-to-loss path, shared by training and evaluation."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.models.attention import AttnSpec
from tunesmith.parallel.fsdp import gathered_head_weight
from tunesmith.train.loss import linear_cross_entropy
from tunesmith.train.runtime import Runtime


def attention_for(batch: dict, dev: torch.device) -> tuple[AttnSpec | None, torch.Tensor | None]:
    """Map the batch's optional attention inputs onto (attention spec, position ids)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return None, None  # plain causal: the fastest SDPA path
    return AttnSpec.padding(mask.to(dev, non_blocking=True)), None


def batch_loss_sum(model: nn.Module, batch: dict, rt: Runtime, need_grad: bool = True) -> torch.Tensor:
    """Sum of token cross-entropies of one batch (labels already shifted, -100 ignored)."""
    dev = rt.device
    input_ids = batch["input_ids"].to(dev, non_blocking=True)  # [B, T]
    labels = batch["labels"].to(dev, non_blocking=True)  # [B, T]
    attn, positions = attention_for(batch, dev)
    with rt.autocast():
        hidden = model(input_ids, positions=positions, attn=attn, return_hidden=True)  # [B, T, D]
    # [V, D]; under FSDP2 the gathered head (the root keeps it gathered until backward), under
    # TP a vocab-sharded DTensor that the loss handles vocab-parallel.
    head = gathered_head_weight(model)
    if not need_grad:
        head = head.detach()
    return linear_cross_entropy(hidden, head, labels, compute_dtype=rt.compute_dtype)
