"""The token objective plus the MoE router's load-balancing loss (`train.router_aux_loss_coef`).

HF adds `coef * aux` to the mean cross-entropy of one forward, with aux computed over that
forward's tokens (`load_balancing_loss_func`; padding left out through the attention mask). The
trainer here divides a step's summed losses by the step's global target count N, so each
micro-batch contributes

    loss_sum(mb) = CE_sum(mb) + coef * aux(mb) * n(mb)        (n = the micro-batch's targets)

and the step's loss is  CE_sum / N + coef * sum_mb (n(mb) / N) * aux(mb):
  * one micro-batch on one rank: exactly HF's loss (mean CE + coef * aux);
  * k micro-batches (gradient accumulation) and data-parallel ranks: the cross-entropy of the
    whole step as before, plus coef times the target-weighted mean of the micro-batches' aux
    losses (their plain mean when micro-batches hold equal target counts, as packed blocks do).
    Each aux is over its own micro-batch's routing, as in HF, not over the whole step's.
  * context parallelism: a micro-batch's sequences are spread over the cp ranks; the routing
    counts are summed over them, so the aux loss is that of the whole micro-batch, as in one
    process (each rank adds its share; `MoE.router_aux_loss`).
Evaluation reports the cross-entropy alone. The logged `router_aux_loss` is the same weighted
mean over the steps since the last record.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from tunesmith.objective.forward import (
    TokenObjective,
    batch_loss_sum,
    counted_token_mask,
    target_count,
)
from tunesmith.parallel.cp import context_parallel_of
from tunesmith.runtime import Runtime


def _group_sum(t: torch.Tensor, group) -> torch.Tensor:
    """t summed over the ranks of `group` (a new tensor; no gradient)."""
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    return t


class RouterAuxObjective(TokenObjective):
    """TokenObjective + coef * the router load-balancing loss, weighted by target tokens."""

    def __init__(self, coef: float) -> None:
        self.coef = coef
        self._sums: torch.Tensor | None = None  # [2] (aux * n, n) since the last record

    def loss_sum(self, model: nn.Module, batch: dict, rt: Runtime) -> torch.Tensor:
        # Routing is kept during this forward only: activation checkpointing's recompute in
        # backward (and evaluation) must not keep more ([N, E] and the router input per layer).
        model.keep_router_stats(True)
        try:
            ce = batch_loss_sum(model, batch, rt, need_grad=True)
        finally:
            model.keep_router_stats(False)
        mask = counted_token_mask(model, batch)  # [B, T] host; padding is not routed traffic
        cp = context_parallel_of(model)
        reduce = None if cp is None else functools.partial(_group_sum, group=cp.group)
        aux = model.router_aux_loss(mask, reduce)  # the routing this forward kept (then released)
        n = float(target_count(model, batch))
        if reduce is None:
            aux_all, weight = aux.detach(), n
        else:  # aux is this rank's share of the sequence's loss (MoE.router_aux_loss)
            aux_all, weight = reduce(torch.stack([aux.detach(), aux.new_tensor(n)])).unbind()
        sums = torch.stack([aux_all * n, aux.new_tensor(n)])
        self._sums = sums if self._sums is None else self._sums + sums
        # Under cp the shares times the sequence's target count add up over the cp ranks to
        # coef * n * aux of the whole sequence: what one process adds for this micro-batch.
        return ce + (self.coef * weight * aux).to(ce.dtype)

    def log_fields(self, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> dict[str, float]:
        """The target-weighted mean aux loss since the last call (over all ranks with
        `all_reduce`); resets. One host read."""
        if self._sums is None:
            return {}
        sums = all_reduce(self._sums) if all_reduce is not None else self._sums
        aux_n, n = sums.tolist()
        self._sums = None
        return {"router_aux_loss": aux_n / max(n, 1.0)}
