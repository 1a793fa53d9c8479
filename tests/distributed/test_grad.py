"""Gradient settling under TP on gloo: bucketed Partial sums equal DTensor's redistribute."""

from __future__ import annotations

from tests.distributed.helpers import REPO, torchrun


def test_partial_grads_settle_in_one_bucket_like_redistribute():
    proc = torchrun(4, [str(REPO / "tests/distributed/_settle_worker.py")], timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("rank ")]
    assert proc.returncode == 0 and len(lines) == 4, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert all(" ok buckets=[(3, (1,))]" in ln for ln in lines), lines
