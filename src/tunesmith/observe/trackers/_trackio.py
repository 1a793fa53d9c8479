"""trackio: Hugging Face's local-first tracker (SQLite under TRACKIO_DIR, optional Space sync).

A resumed run continues the run of the same name (resume="allow").
"""

from __future__ import annotations

from typing import Any

from tunesmith.observe.trackers.base import Tracker, summary_scalars


class TrackioTracker(Tracker):
    name = "trackio"
    module = "trackio"

    def start(self, config: dict[str, Any], resume_id: str | None, step: int) -> None:
        import trackio

        kwargs: dict[str, Any] = {
            "project": self.s.project, "name": resume_id or self.s.run_name, "config": config,
            "resume": "allow", "embed": False, "auto_log_gpu": False, "auto_log_cpu": False,
        }
        kwargs.update(self.s.options)
        self.run = trackio.init(**kwargs)
        self.run_id = self.run.name

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        step = int(summary.get("steps", 0))
        self.run.log({f"summary/{k}": float(v) for k, v in summary_scalars(summary).items()
                      if not isinstance(v, str)}, step=step)

    def finish(self, ok: bool) -> None:
        self.run.finish()
