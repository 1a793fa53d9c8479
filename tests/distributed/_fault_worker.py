"""torchrun worker that injects a fault on one rank, then runs the real `tunesmith` CLI.

TUNESMITH_TEST_FAULT=raise|hang|nan, TUNESMITH_TEST_FAULT_RANK (default 1), at optimizer step 2
(0-based: the third step). `hang` sleeps (bounded) so its peers block in the next collective and
must time out. `nan` makes that rank's loss infinite for the step, so the global loss and the
reduced gradients are non-finite on every rank: the NaN guard's case.
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
import tunesmith.objective.forward as forward_mod  # noqa: E402  (what TokenObjective calls)

_original_loss = forward_mod.batch_loss_sum


def _faulty_loss(model, batch, rt, need_grad=True):
    out = _original_loss(model, batch, rt, need_grad)
    trainer = _faulty_loss.trainer
    if (os.environ.get("TUNESMITH_TEST_FAULT") == "nan" and trainer is not None
            and int(os.environ.get("RANK", "0")) == int(os.environ.get("TUNESMITH_TEST_FAULT_RANK", "1"))
            and trainer.progress.step == 2):
        return out * float("inf")
    return out


_faulty_loss.trainer = None
_original_init = trainer_mod.Trainer.__post_init__


def _post_init(self):
    _original_init(self)
    _faulty_loss.trainer = self  # the loss hook reads the step from the trainer that runs


trainer_mod.Trainer.__post_init__ = _post_init
forward_mod.batch_loss_sum = _faulty_loss

if __name__ == "__main__":
    from tunesmith.cli.main import main

    # Diagnosis only: a worker still alive after 60 s prints every thread's stack (it does not
    # exit), so a test that times out shows where each rank was stuck.
    faulthandler.dump_traceback_later(60, exit=False)

    main(sys.argv[1:])
