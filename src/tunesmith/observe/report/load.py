"""Read a run directory (finished, running or interrupted) into what the report draws.

Only files the run writes as it goes are needed: metrics.jsonl (train and eval records),
events.jsonl (starts, resumes, checkpoints, stops), config.yaml; summary.json exists once a run
has ended. A half-written last line (a running or killed process) is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from tunesmith.errors import TunesmithError


@dataclass
class RunData:
    path: Path
    label: str
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    updated: str = ""  # last write to metrics.jsonl, UTC

    @property
    def status(self) -> str:
        if any(e.get("event") == "error" for e in self.events[-1:]):
            return "failed: " + str(self.events[-1].get("error", ""))
        if self.summary is None:
            last = self.train[-1]["step"] if self.train else 0
            return f"running or stopped without a summary (last record: step {last})"
        if self.summary.get("interrupted"):
            return (f"interrupted by {self.summary.get('stopped_by', 'a signal')} at step "
                    f"{self.summary.get('steps')}")
        return f"finished ({self.summary.get('steps')} steps)"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of a process that is writing or was killed
        if isinstance(rec, dict):
            out.append(rec)
    return out


def load_run(path: Path, label: str | None = None, live_summary: dict[str, Any] | None = None) -> RunData:
    """`live_summary`: the summary of the run being finished, before summary.json is written."""
    metrics = path / "metrics.jsonl"
    if not path.is_dir() or not (metrics.is_file() or (path / "config.yaml").is_file()):
        raise TunesmithError(f"{path} is not a tunesmith run directory (no metrics.jsonl or config.yaml)")
    run = RunData(path=path, label=label or path.resolve().name)
    for rec in _jsonl(metrics):
        if "step" not in rec:
            continue
        (run.evals if "eval_loss" in rec else run.train).append(rec)
    run.events = _jsonl(path / "events.jsonl")
    if (path / "config.yaml").is_file():
        try:
            run.config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise TunesmithError(f"{path / 'config.yaml'}: not valid YAML ({e})") from None
    run.summary = live_summary
    if run.summary is None and (path / "summary.json").is_file():
        try:
            run.summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            run.summary = None
    if metrics.is_file():
        run.updated = datetime.fromtimestamp(metrics.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return run


def load_runs(paths: list[Path], live_summary: dict[str, Any] | None = None) -> list[RunData]:
    """Runs labelled by directory name, with the parent added where two names collide."""
    names = [p.resolve().name for p in paths]
    runs = []
    for p, name in zip(paths, names):
        label = f"{p.resolve().parent.name}/{name}" if names.count(name) > 1 else name
        runs.append(load_run(p, label, live_summary if len(paths) == 1 else None))
    return runs
