"""Failure behaviour: a failing rank ends the whole job promptly, naming the rank and the error;
a hung rank makes its peers fail at `parallel.timeout_s` instead of hanging forever."""

from __future__ import annotations

import time

import pytest

from tests.distributed.helpers import REPO, job, torchrun

pytestmark = pytest.mark.slow

# "Promptly": far below the 600 s default collective timeout a real hang would wait. On NCCL,
# survivors blocked in a CUDA wait only go at torchrun's SIGKILL 30 s after its SIGTERM;
# measured on 2 H200 ranks, worker start included: 45 s (raise) and 86 s (hang).
PROMPT_S = 150


@pytest.fixture(scope="module")
def data(tiny_tokenizer_dir, demo_text):
    train, valid = demo_text
    return tiny_tokenizer_dir, train, valid


def _fault_run(data, tmp_path, fault: str, extra: tuple[str, ...] = ()):
    argv = ["train", *job(*data, tmp_path / "run", dp=2, steps=6, extra=extra)]
    start = time.monotonic()
    proc = torchrun(2, [str(REPO / "tests/distributed/_fault_worker.py"), *argv], timeout=240,
                    TUNESMITH_TEST_FAULT=fault, TUNESMITH_TEST_HANG_S="8")
    return proc, time.monotonic() - start


def test_raising_rank_ends_job_with_rank_and_error(data, tmp_path):
    proc, elapsed = _fault_run(data, tmp_path, "raise")
    assert proc.returncode != 0, proc.stderr[-3000:]
    # torchrun's summary names the root-cause rank and the recorded exception.
    assert "rank      : 1" in proc.stderr or "rank: 1" in proc.stderr, proc.stderr[-3000:]
    assert "injected failure on rank 1" in proc.stderr, proc.stderr[-3000:]
    assert elapsed < PROMPT_S, f"took {elapsed:.0f}s to come down"


def test_hung_rank_times_out_instead_of_hanging(data, tmp_path):
    # Rank 1 sleeps 8 s inside step 3; rank 0 waits in the next collective and must give up
    # after parallel.timeout_s=3: the job fails (had nobody timed out, it would finish fine).
    proc, elapsed = _fault_run(data, tmp_path, "hang", ("parallel.timeout_s=3",))
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "rank      : 0" in proc.stderr or "rank: 0" in proc.stderr, proc.stderr[-3000:]
    assert "timed out" in proc.stderr.lower() or "timeout" in proc.stderr.lower(), proc.stderr[-3000:]
    assert elapsed < PROMPT_S, f"took {elapsed:.0f}s to come down"


def test_launch_reports_failing_rank_in_one_line(data, tmp_path, monkeypatch, capsys):
    """`tunesmith launch` turns torchrun's failure report into one line naming the rank."""
    import argparse

    from tunesmith.parallel import launch as launch_mod
    from tests.distributed.helpers import worker_env

    for k, v in worker_env(TUNESMITH_TEST_FAULT="raise").items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO)
    overrides = job(*data, tmp_path / "run", dp=2, steps=6)
    args = argparse.Namespace(nproc_per_node=2, nnodes=1, node_rank=None, rdzv_endpoint=None,
                              rdzv_id=None, rdzv_backend="c10d", max_restarts=0, log_dir=None,
                              recipe=None, overrides=overrides)
    code = launch_mod.launch(args, ["train", *overrides], module="tests.distributed._fault_worker")
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("tunesmith: error:")]
    assert code != 0 and line, err[-3000:]
    assert "rank 1" in line[0] and "injected failure on rank 1" in line[0], line[0]
