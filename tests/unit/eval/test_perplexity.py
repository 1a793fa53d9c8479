"""eval/perplexity: the fused-loss evaluation equals a plain logits cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.peft_utils import tiny_model
from tunesmith.errors import TunesmithError
from tunesmith.eval.perplexity import eval_metrics, evaluate_loss
from tunesmith.runtime import resolve_runtime


def test_eval_loss_matches_a_plain_cross_entropy():
    model, _, cfg = tiny_model(seed=3)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        labels[0, :4] = -100  # some ignored targets
        batches.append({"input_ids": ids, "labels": labels})
    out = evaluate_loss(model, batches, resolve_runtime("cpu", "fp32"))
    with torch.no_grad():
        total = sum(F.cross_entropy(model(b["input_ids"]).flatten(0, 1), b["labels"].flatten(),
                                    ignore_index=-100, reduction="sum") for b in batches)
    count = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert out["eval_tokens"] == count
    assert math.isclose(out["eval_loss"], float(total) / count, rel_tol=1e-5)
    assert math.isclose(out["perplexity"], math.exp(out["eval_loss"]), rel_tol=1e-9)
    assert model.training  # restored after evaluation
    assert evaluate_loss(model, batches, resolve_runtime("cpu", "fp32"), max_batches=1)["eval_tokens"] \
        == int((batches[0]["labels"] != -100).sum())


def test_eval_metrics_with_no_tokens_is_refused():
    """A loss over zero tokens would read as 0.0 and a perfect perplexity of 1.0 (issue #10):
    no metric is reported, one clear line says why."""
    with pytest.raises(TunesmithError, match="evaluation saw no target tokens"):
        eval_metrics(0.0, 0)
    assert eval_metrics(2.0, 1) == {"eval_loss": 2.0, "perplexity": math.exp(2.0), "eval_tokens": 1}
