"""Graceful preemption: SIGTERM/SIGINT stop training at the next step boundary.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM some seconds before killing a job,
and Ctrl-C sends SIGINT. The first signal only sets a flag: the loop finishes the step it is in,
saves a checkpoint and returns normally (exit 0). A second signal means "now": the handlers are
restored and `TrainingAborted` is raised wherever the program is (a save in flight stays a
hidden temp dir that the next start removes, so no half checkpoint is ever visible).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger("tunesmith")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingAborted(KeyboardInterrupt):
    """A second stop signal: abort at once. Exit code 128 + signal number, as a kill would give."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"aborted by a second {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


class StopRequest:
    """Context manager installing the stop handlers for the training loop; restores on exit."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def __enter__(self) -> StopRequest:
        # Python only lets the main thread set handlers; elsewhere (a notebook worker thread)
        # training simply runs with whatever handling the process already has.
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self.restore()
            raise TrainingAborted(signum)
        self.signum = signum
        log.warning("received %s: stopping after the current step (send it again to abort at once)",
                    signal.Signals(signum).name)
