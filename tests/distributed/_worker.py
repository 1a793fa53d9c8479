"""torchrun worker for the distributed tests: runs each job (a list of `train` overrides) in turn
in one process group, so N strategies cost one launch.

Usage: `_worker.py DIR` stays up for the whole test session (helpers.RankPool): it runs
DIR/0.json, DIR/1.json, ... (each a batch of jobs) as the tests write them, and writes
DIR/<i>.rank<RANK>.rc (the batch's exit code) after each; a batch holding `null` ends it.
Torch, the CLI and the process group start once per session instead of once per test file.
It also ends when the test process (TUNESMITH_TEST_PARENT) is gone, so a killed pytest leaves
no ranks behind."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tunesmith.cli.main import run


def run_jobs(jobs: list[list[str]]) -> int:
    for job in jobs:
        rc = run(["-q", "train", *job])
        if rc:
            out = next((a.split("=", 1)[1] for a in job if a.startswith("output.dir=")), "?")
            print(f"test worker (rank {os.environ.get('RANK', '?')}): scenario {Path(out).name} "
                  f"failed with exit code {rc} ({out})", file=sys.stderr, flush=True)
            return rc
    return 0


def _parent_alive() -> bool:
    try:
        os.kill(int(os.environ["TUNESMITH_TEST_PARENT"]), 0)
    except ProcessLookupError:
        return False
    return True


def serve(queue: Path) -> int:
    rank = os.environ.get("RANK", "0")
    i = 0
    while True:
        batch = queue / f"{i}.json"
        while not batch.exists():  # written whole (renamed into place) by the test process
            if not _parent_alive():
                return 0
            time.sleep(0.1)
        jobs = json.loads(batch.read_text())
        if jobs is None:
            return 0
        rc = run_jobs(jobs)
        tmp = queue / f"{i}.rank{rank}.rc.tmp"
        tmp.write_text(str(rc))
        tmp.rename(queue / f"{i}.rank{rank}.rc")
        if rc:
            return rc
        i += 1


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1])))
