"""A guide's command line under torchrun: `tunesmith run_clm ...` launched on 2 processes trains
distributed exactly like `tunesmith train` (issue #13 item 1): the same losses as one process
with the same global batch, and a checkpoint written by 2 ranks."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_path
from tests.distributed.helpers import TEST_DEVICE, losses, torchrun
from tunesmith.cli.main import run


def _run_clm(out, per_device: int) -> list[str]:
    flags = ["run_clm", "--model_name_or_path", str(shared_path("models", "stories260K", "hf")),
             "--train_file", str(shared_path("text", "tinyshakespeare", "input.txt")),
             "--validation_split_percentage", "5", "--block_size", "64",
             "--per_device_train_batch_size", str(per_device), "--max_steps", "3",
             "--logging_steps", "1", "--save_steps", "3", "--learning_rate", "3e-3",
             "--do_train", "--output_dir", str(out)]
    return [*flags, "--use_cpu"] if TEST_DEVICE == "cpu" else flags


def test_run_clm_under_torchrun_matches_one_process(tmp_path):
    single = tmp_path / "single"  # the one-process reference, in this process (no start-up)
    assert run(_run_clm(single, per_device=4)) == 0

    dist = tmp_path / "dist"
    two = torchrun(2, ["-m", "tunesmith", *_run_clm(dist, per_device=2)], timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    # Two ranks of 2 rows see the same 4 rows per step as one process of 4.
    got, want = losses(dist), losses(single)
    assert len(got) == len(want) == 3
    for (loss, gn), (loss1, gn1) in zip(got, want):
        assert loss == pytest.approx(loss1, abs=1e-4) and gn == pytest.approx(gn1, rel=1e-3)
    manifest = json.loads(next((dist / "checkpoints").glob("step_*/manifest.json")).read_text())
    assert manifest["world_size"] == 2
