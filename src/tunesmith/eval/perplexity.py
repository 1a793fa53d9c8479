"""Evaluation loss and perplexity over a loader: sum of token losses / count of target tokens."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.objective.forward import batch_loss_sum
from tunesmith.objective.loss import IGNORE_INDEX
from tunesmith.runtime import Runtime


def eval_metrics(loss_sum: float, count: int) -> dict[str, float]:
    if count <= 0:
        # A loss over nothing would read as 0.0 and a perplexity of 1.0: a perfect score.
        raise TunesmithError(
            "evaluation saw no target tokens (every label is padding or masked out), so there is "
            "no loss or perplexity to report; check the validation data and its truncation"
        )
    loss = loss_sum / count
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "eval_tokens": count}


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader, rt: Runtime, max_batches: int | None = None,
                  all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Loss over `loader`; with `all_reduce` (sum over data-parallel ranks, each holding its own
    shard of the validation set) the sums and counts are global."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=rt.device)
    count = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        count += int((batch["labels"] != IGNORE_INDEX).sum())  # host tensor: no device sync
        total += batch_loss_sum(model, batch, rt, need_grad=False)
    model.train(was_training)
    if all_reduce is not None:
        sums = all_reduce(torch.stack([total.double(), torch.tensor(float(count), device=total.device).double()]))
        total, count = sums[0], int(sums[1].item())
    return eval_metrics(total.item(), count)
