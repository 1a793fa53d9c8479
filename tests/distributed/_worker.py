"""torchrun worker for the distributed tests: run each job (a list of `train` overrides) in turn
in one process group, so N strategies cost one launch. Usage: _worker.py JOBS.json"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tunesmith.cli.main import run


def main() -> int:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs:
        rc = run(["-q", "train", *job])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
