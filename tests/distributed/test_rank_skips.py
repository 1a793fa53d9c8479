"""On a machine with fewer GPUs than a test's ranks, that test skips with a reason (and only
it: the 2-rank layouts no longer wait on the 4-rank launch). Checked here on CPU by giving the
skip logic a GPU count; the real check is `TUNESMITH_TEST_DEVICE=cuda pytest tests/distributed`
on a 2-GPU machine (see docs/distributed.md)."""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.distributed import helpers, test_training


def test_cpu_suite_runs_any_rank_count():
    assert helpers.gpus_present("cpu") is None
    assert helpers.can_launch(8, "cpu")
    helpers.skip_unless_ranks(8, "cpu")  # no skip


def test_two_gpus_skip_four_rank_tests(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert helpers.can_launch(2, "cuda") and not helpers.can_launch(4, "cuda")
    helpers.skip_unless_ranks(2, "cuda")
    with pytest.raises(pytest.skip.Exception, match=r"needs 4 GPUs \(one per rank\), 2 present"):
        helpers.skip_unless_ranks(4, "cuda")


def test_two_rank_fixture_does_not_require_the_four_rank_one():
    # A fixture parameter would make pytest set world4 up (and skip world2 with it) first.
    params = inspect.signature(test_training.world2.__wrapped__).parameters
    assert "world4" not in params
