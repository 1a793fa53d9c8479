"""The one forward-to-loss path, shared by training and evaluation."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.models.attention import AttnSpec
from tunesmith.parallel.fsdp import gathered_head_weight
from tunesmith.objective.loss import linear_cross_entropy
from tunesmith.runtime import Runtime


def attention_for(batch: dict, dev: torch.device) -> tuple[AttnSpec | None, torch.Tensor | None]:
    """Map the batch's optional attention inputs onto (attention spec, position ids).

    doc_ids [B, T] (packed SFT): attention stays inside each document, and positions restart
    per document (the batch's position_ids [B, T] when given). attention_mask [B, T]: padding.
    Neither: plain causal attention, the fastest SDPA path.
    """
    positions = batch.get("position_ids")
    if positions is not None:
        positions = positions.to(dev, non_blocking=True)
    doc_ids = batch.get("doc_ids")
    if doc_ids is not None:
        return AttnSpec.documents(doc_ids.to(dev, non_blocking=True)), positions
    mask = batch.get("attention_mask")
    if mask is None:
        return None, positions
    return AttnSpec.padding(mask.to(dev, non_blocking=True)), positions


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
    hidden, head = head_with_bias(hidden, model.output, head)  # [B, T, D(+1)], [V, D(+1)]
    if not need_grad:
        head = head.detach()
    return linear_cross_entropy(hidden, head, labels, compute_dtype=rt.compute_dtype)


def head_with_bias(hidden: torch.Tensor, output: nn.Module,
                   weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, weight) for the fused loss; a head bias (BERT/RoBERTa MLM decoder) is folded in
    as one extra column: [h, 1] @ [W, b]^T = h @ W^T + b, so the loss stays one fused matmul and
    the bias still gets its gradient through the concatenation. `weight`: the head weight as
    computation may use it (default `output.weight`)."""
    weight = output.weight if weight is None else weight  # [V, D]
    bias = getattr(output, "bias", None)
    if bias is None:
        return hidden, weight
    ones = torch.ones((*hidden.shape[:-1], 1), dtype=hidden.dtype, device=hidden.device)
    return torch.cat([hidden, ones], dim=-1), torch.cat([weight, bias[:, None]], dim=1)
