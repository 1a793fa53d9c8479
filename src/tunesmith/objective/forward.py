"""The one forward-to-loss path, shared by training and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.models.attention import AttnSpec, document_positions
from tunesmith.objective.loss import IGNORE_INDEX, linear_cross_entropy
from tunesmith.parallel.cp import ContextParallel, context_parallel_of
from tunesmith.parallel.fsdp import gathered_head_weight
from tunesmith.runtime import Runtime
from tunesmith.transforms.float8 import float8_head_recipe

_PAD_DOC = -1  # document id of padding under context parallelism (as the SFT collator's)


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


def context_parallel_batch(cp: ContextParallel, batch: dict) -> dict:
    """This cp rank's part of a [B, T] batch (host tensors), cut as `ContextParallel.local_index`
    says, T padded on the right to a multiple of 2 x cp.

    Position ids are taken on the whole row first (the batch's own, else restarting in every
    packed document, else 0..T-1), so they are what one process would use. The mask travels as
    each token's row index and document id (`cp_index`, `cp_doc` [B, T_local]); a padding mask
    becomes a document id of its own (right padding: no real token attends to it, exactly as
    under the causal padding mask)."""
    ids, labels = batch["input_ids"], batch["labels"]
    b, t = ids.shape
    doc = batch.get("doc_ids")
    positions = batch.get("position_ids")
    if positions is None:
        positions = document_positions(doc) if doc is not None else torch.arange(t).expand(b, t)
    if doc is None:
        mask = batch.get("attention_mask")
        doc = torch.zeros_like(ids) if mask is None else torch.where(mask.bool(), 0, _PAD_DOC)
    pad = -t % (2 * cp.size)
    if pad:  # ignored targets in their own document: nothing real sees them
        ids, labels, doc, positions = (F.pad(x, (0, pad), value=v) for x, v in
                                       ((ids, 0), (labels, IGNORE_INDEX), (doc, _PAD_DOC), (positions, 0)))
    idx = cp.local_index(t + pad)  # [T_local]
    return {"input_ids": ids[:, idx], "labels": labels[:, idx], "position_ids": positions[:, idx],
            "cp_index": idx.expand(b, -1), "cp_doc": doc[:, idx]}


def counted_token_mask(model: nn.Module, batch: dict) -> torch.Tensor | None:
    """[B, T] (1 = a real token) over the tokens this rank computes, or None when all are:
    the batch's padding mask, or under context parallelism its cp part, where the right padding
    and the pad to a multiple of 2 x cp are the tokens of the padding document."""
    cp = context_parallel_of(model)
    if cp is None:
        return batch.get("attention_mask")
    return (context_parallel_batch(cp, batch)["cp_doc"] != _PAD_DOC).long()


def target_count(model: nn.Module, batch: dict) -> int:
    """Targets (labels != -100) among the tokens this rank computes: its cp part under context
    parallelism, else the whole batch. Summed over dp x cp ranks it is the step's global count."""
    cp = context_parallel_of(model)
    labels = batch["labels"] if cp is None else context_parallel_batch(cp, batch)["labels"]
    return int((labels != IGNORE_INDEX).sum())


def head_inputs(model: nn.Module, batch: dict, rt: Runtime, need_grad: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [B, T, D(+1)], head weight [V, D(+1)], labels [B, T]) on the device: what the fused
    head + cross-entropy kernel reads for one batch (labels already shifted, -100 ignored). Under
    context parallelism, this rank's part of the sequence."""
    dev = rt.device
    cp = context_parallel_of(model)
    if cp is not None:
        batch = context_parallel_batch(cp, batch)
    input_ids = batch["input_ids"].to(dev, non_blocking=True)  # [B, T]
    labels = batch["labels"].to(dev, non_blocking=True)  # [B, T]
    if cp is not None:
        positions = batch["position_ids"].to(dev, non_blocking=True)
        attn = AttnSpec.custom(cp.attention(batch["cp_index"].to(dev), batch["cp_doc"].to(dev)))
    else:
        attn, positions = attention_for(batch, dev)
    with rt.autocast():
        hidden = model(input_ids, positions=positions, attn=attn, return_hidden=True)  # [B, T, D]
    # [V, D]; under FSDP2 the gathered head (the root keeps it gathered until backward), under
    # TP a vocab-sharded DTensor that the loss handles vocab-parallel.
    head = gathered_head_weight(model)
    hidden, head = head_with_bias(hidden, model.output, head)  # [B, T, D(+1)], [V, D(+1)]
    if not need_grad:
        head = head.detach()
    return hidden, head, labels


def batch_loss_sum(model: nn.Module, batch: dict, rt: Runtime, need_grad: bool = True) -> torch.Tensor:
    """Sum of token cross-entropies of one batch (labels already shifted, -100 ignored); under
    context parallelism, of this rank's part of the sequence (the caller sums over ranks)."""
    hidden, head, labels = head_inputs(model, batch, rt, need_grad)
    # float8: the recipe the float8 transform marked the head with (train.float8_skip), or None.
    return linear_cross_entropy(hidden, head, labels, compute_dtype=rt.compute_dtype,
                                float8=float8_head_recipe(model.output))


class TokenObjective:
    """The trainer's objective for clm / sft / mlm: cross-entropy summed over target tokens,
    normalised by the step's global count of target tokens. (task=dpo has its own:
    `objective.preference.PreferenceObjective`, with the same three methods.)"""

    kind = "tokens"

    def count(self, model: nn.Module, batch: dict) -> int:
        return target_count(model, batch)

    def loss_sum(self, model: nn.Module, batch: dict, rt: Runtime) -> torch.Tensor:
        return batch_loss_sum(model, batch, rt, need_grad=True)

    def log_fields(self, all_reduce=None) -> dict[str, float]:  # the preference objective's signature
        return {}


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
