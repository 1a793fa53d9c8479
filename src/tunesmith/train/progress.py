"""Progress display: a live rich bar on a terminal, plain lines otherwise (logs, CI, pipes)."""

from __future__ import annotations

import sys
from typing import Any


def _fmt(record: dict[str, Any]) -> str:
    loss = record.get("loss")
    parts = [f"loss {loss:.4f}" if loss is not None else "loss n/a (skipped)", f"lr {record['lr']:.2e}"]
    if record.get("skipped_steps"):
        parts.append(f"{record['skipped_steps']} skipped")
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    return "  ".join(parts)


class ProgressReporter:
    def __init__(self, total: int, enabled: bool = True, stream=None, muted: bool = False):
        self.total = total
        self.stream = stream or sys.stderr
        # muted: ranks other than 0 of a distributed job print nothing at all (notes included).
        self.muted = muted
        self.live = enabled and not muted and self.stream.isatty()
        self.enabled = enabled and not muted
        self._bar = None
        self._task = None

    def start(self, step: int) -> None:
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.console import Console

        self._bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(file=self.stream), transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=self.total, completed=step, info="")

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def update(self, step: int, record: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=_fmt(record))
        elif self.enabled:
            print(f"step {step}/{self.total}  {_fmt(record)}", file=self.stream, flush=True)

    def note(self, message: str) -> None:
        if self.muted:
            return
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            print(message, file=self.stream, flush=True)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
