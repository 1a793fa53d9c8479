"""The one small interface every experiment tracker implements, and the shared conversions.

A tracker sees four things from a run (rank 0 only): the resolved config once at start, every
metrics record (train and eval, the same dicts as `metrics.jsonl`), the final summary, and
optionally the HF model directory as an artifact. `run_id` is what a resumed run needs to
continue the same tracker run; it is stored in each checkpoint's manifest.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class TrackerSettings:
    """What every tracker is told, from `logging.*` (see `tunesmith.config.schema.LoggingConfig`)."""

    project: str
    run_name: str
    out_dir: Path
    tags: list[str] = field(default_factory=list)
    entity: str | None = None
    tracking_uri: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # logging.tracker_options[name]


class Tracker(ABC):
    name: ClassVar[str]  # as in logging.trackers
    module: ClassVar[str]  # the library it imports (its extra has the tracker's name)

    def __init__(self, settings: TrackerSettings):
        self.s = settings
        self.run_id: str | None = None

    @abstractmethod
    def start(self, config: dict[str, Any], resume_id: str | None, step: int) -> None:
        """Open (or, with `resume_id`, continue) the run; `step` is where training resumes."""

    @abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None:
        """One record, already flattened to `train/<key>` / `eval/<key>` numbers."""

    @abstractmethod
    def log_summary(self, summary: dict[str, Any]) -> None: ...

    def log_artifact(self, path: Path, name: str) -> bool:
        """Upload a directory; False where the tracker keeps no artifacts."""
        return False

    @abstractmethod
    def finish(self, ok: bool) -> None: ...


def metric_items(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: eval records under `eval/`, the rest `train/`.

    Non-numbers (None, strings) are left out; `step` is passed separately.
    """
    is_eval = "eval_loss" in record
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        name = key.removeprefix("eval_") if is_eval else key
        out[f"{'eval' if is_eval else 'train'}/{name}"] = float(value)
    return out


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> `section.key` hyper-parameters; lists and None as JSON text.

    Trackers take scalars only; one level of sections is flattened fully, deeper dicts
    (model.overrides, tracker_options) are flattened too so each override is its own column.
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def summary_scalars(summary: dict[str, Any]) -> dict[str, float | str]:
    """The summary's numbers and short strings (paths, device) for a tracker's summary view."""
    return {k: v for k, v in summary.items()
            if isinstance(v, (int, float, str)) and not (isinstance(v, float) and not math.isfinite(v))}
