"""Experiment trackers chosen by `logging.trackers`, fed from rank 0 through one fan-out.

    logging:
      trackers: [tensorboard, wandb, mlflow, trackio]
      project: my-project
      tracker_options: {wandb: {mode: offline}}

Each tracker's library is an optional extra (`pip install 'tunesmith[wandb]'`); a missing one is
a one-line error before the run starts (`check_trackers`). A tracker that fails mid-run (a
network error, say) is reported once and dropped: trackers observe training, they never stop it.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from tunesmith.config.schema import LoggingConfig
from tunesmith.errors import TunesmithError
from tunesmith.observe.trackers._mlflow import MlflowTracker
from tunesmith.observe.trackers._tensorboard import TensorBoardTracker
from tunesmith.observe.trackers._trackio import TrackioTracker
from tunesmith.observe.trackers._wandb import WandbTracker
from tunesmith.observe.trackers.base import Tracker, TrackerSettings, metric_items

log = logging.getLogger("tunesmith")

TRACKERS: dict[str, type[Tracker]] = {
    t.name: t for t in (TensorBoardTracker, WandbTracker, MlflowTracker, TrackioTracker)
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # sys.modules[module] = None, or a broken install
        return False


def check_trackers(cfg: LoggingConfig) -> None:
    """Every chosen tracker's library is installed; else one line naming the extra to install."""
    for name in cfg.trackers:
        if not _importable(TRACKERS[name].module):
            raise TunesmithError(
                f"logging.trackers: {name} needs the {TRACKERS[name].module} package; install it "
                f"with: pip install 'tunesmith[{name}]'"
            )


class Trackers:
    """All chosen trackers behind one call each; on ranks other than 0 it holds none."""

    def __init__(self, cfg: LoggingConfig, out_dir: Path, enabled: bool = True):
        self.trackers: list[Tracker] = []
        self.seconds = 0.0  # time spent in tracker calls (reported as tracker_s)
        self.log_seconds = 0.0  # of which logging records during training (tracker_log_s)
        if not enabled:
            return
        check_trackers(cfg)
        for name in dict.fromkeys(cfg.trackers):  # each once, in the order given
            settings = TrackerSettings(
                project=cfg.project, run_name=cfg.run_name or out_dir.resolve().name, out_dir=out_dir,
                tags=list(cfg.tags), entity=cfg.entity, tracking_uri=cfg.tracking_uri,
                options=dict(cfg.tracker_options.get(name, {})),
            )
            self.trackers.append(TRACKERS[name](settings))

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, what: str, call) -> None:
        t0 = time.perf_counter()
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as e:  # noqa: BLE001 - a tracker must never stop training
                log.warning("tracker %s: %s failed (%s: %s); it is switched off for this run",
                            tracker.name, what, type(e).__name__, e)
                self.trackers.remove(tracker)
        self.seconds += time.perf_counter() - t0

    def start(self, config: dict[str, Any], resume_ids: dict[str, str] | None, step: int) -> None:
        """Open the runs. A tracker that cannot start is an error (bad URI, no credentials)."""
        t0 = time.perf_counter()
        ids = resume_ids or {}
        for tracker in self.trackers:
            try:
                tracker.start(config, ids.get(tracker.name), step)
            except Exception as e:  # noqa: BLE001 - the library's own error, as one line
                raise TunesmithError(f"logging.trackers: {tracker.name} could not start a run: "
                                     f"{type(e).__name__}: {e}") from e
        self.seconds += time.perf_counter() - t0

    def run_ids(self) -> dict[str, str]:
        """For the checkpoint manifest: what a resumed run needs to continue each tracker run."""
        return {t.name: t.run_id for t in self.trackers if t.run_id is not None}

    def log(self, record: dict[str, Any]) -> None:
        items = metric_items(record)
        if items:
            before = self.seconds
            self._each("log", lambda t: t.log(items, int(record["step"])))
            self.log_seconds += self.seconds - before

    def finish(self, summary: dict[str, Any] | None, model_dir: Path | None, ok: bool) -> None:
        if summary is not None:
            self._each("summary", lambda t: t.log_summary(summary))
        if model_dir is not None and model_dir.is_dir():
            self._each("artifact", lambda t: t.log_artifact(model_dir, model_dir.name))
        self._each("finish", lambda t: t.finish(ok))
        self.trackers = []
