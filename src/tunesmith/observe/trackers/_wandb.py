"""Weights & Biases: online, or offline (WANDB_MODE=offline) into OUTPUT/wandb.

The API key comes from the environment (WANDB_API_KEY) or `wandb login`'s netrc, never from
the config. A resumed run passes the saved run id with resume="allow", so W&B appends to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.observe.trackers.base import Tracker, summary_scalars


class WandbTracker(Tracker):
    name = "wandb"
    module = "wandb"

    def start(self, config: dict[str, Any], resume_id: str | None, step: int) -> None:
        import wandb

        kwargs: dict[str, Any] = {
            "project": self.s.project, "name": self.s.run_name, "tags": self.s.tags or None,
            "entity": self.s.entity, "config": config, "dir": str(self.s.out_dir),
        }
        if resume_id is not None:
            kwargs.update(id=resume_id, resume="allow")
        kwargs.update(self.s.options)
        self.run = wandb.init(**kwargs)
        self.run_id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for key, value in summary_scalars(summary).items():
            self.run.summary[key] = value

    def log_artifact(self, path: Path, name: str) -> bool:
        import wandb

        art = wandb.Artifact(name=f"{self.run.id}-{name}", type="model")
        art.add_dir(str(path))
        self.run.log_artifact(art)
        return True

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)
