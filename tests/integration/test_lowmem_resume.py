"""Low-memory optimizers through the real CLI on CPU: 8-/4-bit AdamW on bf16 weights with
stochastic rounding resume bit for bit (their quantised moments and the rounding's random
draws), and the learning rate stays a tensor that the scheduler and resume update in place.
The optimizer step fused into backward (optim.in_backward) equals the plain step and resumes
exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.test_resume import assert_same, final_params, losses, one_thread, ov, train  # noqa: F401

pytest.importorskip("torchao")


@pytest.mark.parametrize("name", ["adamw8bit", "adamw4bit"])
def test_lowbit_adamw_bf16_resume_is_bitwise_identical(tmp_path: Path, ov, name: str) -> None:  # noqa: F811
    n = 3
    extra = {"optim.name": name, "train.precision": "bf16-pure", "optim.lr": "3e-4",
             "model.overrides": "{vocab_size: 512, dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, "
                                "intermediate_size: 128, max_position_embeddings: 512}"}
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(ov(straight, **extra, **{"train.max_steps": 2 * n})) == 0
    assert train(ov(split, **extra, **{"train.max_steps": n, "checkpoint.every_steps": n})) == 0
    assert train(ov(split, **extra, **{"train.max_steps": 2 * n, "checkpoint.every_steps": n,
                                       "checkpoint.resume": "auto"})) == 0
    assert losses(split) == losses(straight)
    a, b = final_params(split), final_params(straight)
    assert_same(a, b)
    assert next(iter(a.values())).dtype == torch.bfloat16


def test_in_backward_matches_the_plain_step_and_resumes_exactly(tmp_path: Path, ov) -> None:  # noqa: F811
    """optim.in_backward through the real CLI: the same losses and weights as the plain AdamW
    step (clipping off in both), and a run split by a checkpoint ends bit for bit the same."""
    n = 3
    extra = {"train.max_grad_norm": "null"}
    plain, split = tmp_path / "plain", tmp_path / "split"
    ib = {**extra, "optim.in_backward": "true"}
    assert train(ov(plain, **extra, **{"train.max_steps": 2 * n})) == 0
    assert train(ov(split, **ib, **{"train.max_steps": n, "checkpoint.every_steps": n})) == 0
    assert train(ov(split, **ib, **{"train.max_steps": 2 * n, "checkpoint.every_steps": n,
                                    "checkpoint.resume": "auto"})) == 0
    assert losses(split) == losses(plain)
    assert_same(final_params(split), final_params(plain))
    records = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in records if "grad_norm" in r)  # norms from the hooks
