"""Gradient settling under TP on gloo: bucketed Partial sums equal DTensor's redistribute."""

from __future__ import annotations

import re

from tests.distributed.helpers import REPO, torchrun


def test_partial_grads_settle_in_one_bucket_like_redistribute():
    proc = torchrun(4, [str(REPO / "tests/distributed/_settle_worker.py")], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # Searched in the whole output, not per line: the ranks share one stdout, and another
    # process's line can land on the same line.
    ok = re.findall(r"rank (\d+): ok buckets=\[\(3, \(1,\)\)\]", proc.stdout)
    assert sorted(int(r) for r in ok) == [0, 1, 2, 3], proc.stdout[-2000:]
