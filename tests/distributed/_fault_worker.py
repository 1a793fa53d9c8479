"""torchrun worker that injects a fault on one rank, then runs the real `tunesmith` CLI.

TUNESMITH_TEST_FAULT=raise|hang, TUNESMITH_TEST_FAULT_RANK (default 1), at optimizer step 2.
`hang` sleeps (bounded) so its peers block in the next collective and must time out.
Test-only: production code has no fault hooks.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time

from tunesmith.train import trainer as trainer_mod

_original = trainer_mod.Trainer.train_step


def _faulty_train_step(self, micro_batches):
    fault = os.environ.get("TUNESMITH_TEST_FAULT", "")
    rank = int(os.environ.get("RANK", "0"))
    if rank == int(os.environ.get("TUNESMITH_TEST_FAULT_RANK", "1")) and self.progress.step == 2:
        if fault == "raise":
            raise ValueError(f"injected failure on rank {rank}")
        if fault == "hang":
            time.sleep(float(os.environ.get("TUNESMITH_TEST_HANG_S", "20")))
    return _original(self, micro_batches)


trainer_mod.Trainer.train_step = _faulty_train_step

if __name__ == "__main__":
    from tunesmith.cli.main import main

    # Diagnosis only: a worker still alive after 60 s prints every thread's stack (it does not
    # exit), so a test that times out shows where each rank was stuck.
    faulthandler.dump_traceback_later(60, exit=False)

    main(sys.argv[1:])
