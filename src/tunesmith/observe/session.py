"""`RunObserver`: everything a run reports beyond metrics.jsonl, behind a few trainer hooks.

The trainer calls `start` once, wraps each optimizer step in `step(...)`, passes every metrics
record to `log`, notes checkpoints/evals/stops with `event`, and `finish` (or `abort`) ends the
run: trackers get the summary (and the model directory with `logging.log_model`), and
OUTPUT/report.html is written. OUTPUT/events.jsonl keeps the run's history (starts, resumes,
checkpoints, stops) across resumes, so the report can mark them on the step axis.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from tunesmith.config.schema import RunConfig
from tunesmith.observe.flops import StepFlops
from tunesmith.observe.health import DeviceHealth
from tunesmith.observe.profiler import StepProfiler
from tunesmith.observe.trackers import Trackers

log = logging.getLogger("tunesmith")
EVENTS_FILE = "events.jsonl"
REPORT_FILE = "report.html"


@dataclass
class StepWatch:
    """What `RunObserver.step` tells the loop: whether the step was instrumented (its time and
    tokens stay out of throughput), and where the loop leaves the step's global token count."""

    instrumented: bool = False
    tokens: int = 0


class RunObserver:
    def __init__(self, cfg: RunConfig, out_dir: Path, device: torch.device, *, rank: int = 0,
                 world_size: int = 1, is_main: bool = True):
        self.cfg = cfg
        self.out_dir = out_dir
        self.is_main = is_main
        self.trackers = Trackers(cfg.logging, out_dir, enabled=is_main)
        self.health = DeviceHealth(device)
        self.profiler = StepProfiler(cfg.profile, out_dir, rank, device)
        self.flops = StepFlops(cfg.profile.flop_counter_start, world_size) if cfg.profile.count_flops else None
        self.report_s = 0.0
        self.instrumented_steps = 0  # profiled or FLOP-counted: left out of throughput
        self._refill = False  # the next step follows the FLOP-counted one (CUDA)
        self._done = False

    # ------------------------------------------------------------------ run
    def start(self, step: int, resumed_from: Path | None, resume_meta: dict[str, Any] | None) -> None:
        if not self.is_main:
            return
        if resumed_from is None:
            (self.out_dir / EVENTS_FILE).unlink(missing_ok=True)  # a fresh run's history
            self.event("start", step)
        else:
            self.event("resume", step, checkpoint=str(resumed_from))
        ids = (resume_meta or {}).get("trackers") if resumed_from is not None else None
        self.trackers.start(self.cfg.model_dump(mode="json"), ids, step)

    def event(self, kind: str, step: int, **data: Any) -> None:
        """Append one line to OUTPUT/events.jsonl (rank 0)."""
        if not self.is_main:
            return
        rec = {"event": kind, "step": step, "time": datetime.now(timezone.utc).isoformat(), **data}
        with open(self.out_dir / EVENTS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def checkpoint_meta(self) -> dict[str, Any]:
        """Stored in each checkpoint's manifest: the tracker run ids a resume continues."""
        ids = self.trackers.run_ids()
        return {"trackers": ids} if ids else {}

    @contextmanager
    def step(self, step: int, tput: Any) -> Iterator[StepWatch]:
        """Around optimizer step `step` (1-based). Profiled or FLOP-counted steps run inside
        `tput.excluded("profile")` and `health.apart()`: instrumentation slows them and changes
        their memory, so neither their time, tokens nor peak memory count as training's."""
        watched = self.profiler.watches(step)
        count = self.flops is not None and self.flops.due() and not watched
        # The step after the counted one refills the allocator cache emptied after the eager
        # step (cudaMalloc of every block): not a steady-state step either.
        refill, self._refill = self._refill, count and self.health.cuda
        watch = StepWatch(instrumented=count or watched or refill)
        with ExitStack() as stack:
            if watch.instrumented:
                stack.enter_context(tput.excluded("profile"))
                stack.enter_context(self.health.apart(release=count))
                self.instrumented_steps += 1
            self.profiler.before(step)
            with ExitStack() as counting:
                if count:
                    mode = self._flop_mode(counting)
                yield watch
            if count:
                self.flops.record(mode, watch.tokens)
            self.profiler.after(step)
        if self.flops is not None:
            self.flops.seen += 1

    def _flop_mode(self, stack: ExitStack) -> Any:
        # FlopCounterMode is a TorchDispatchMode. A compiled block entered under one misses its
        # guards, and dynamo then runs it eagerly *and marks the code to be skipped from then
        # on*; blocks compiled in place share one code object, so every block stayed eager for
        # the rest of the run (~30% slower, more memory, on a 1B model). With the stance
        # force_eager dynamo stays out of this step: it runs eagerly (the same aten ops, so the
        # same FLOPs) and the compiled graphs serve the next step unchanged, with no recompile.
        stack.enter_context(torch.compiler.set_stance("force_eager"))
        return stack.enter_context(self.flops.counter())

    def record(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add the window's health fields to a train record (before it is written)."""
        record.update(self.health.window())
        return record

    def log(self, record: dict[str, Any]) -> None:
        """A record that was written to metrics.jsonl goes to every tracker."""
        if self.trackers:
            self.trackers.log(record)

    # ------------------------------------------------------------------ end
    def summary_fields(self, flops_per_token: float, tokens_per_s: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.instrumented_steps:
            out["profiled_steps"] = self.instrumented_steps
            if self.health.apart_peak_gib is not None:
                out["profile_peak_mem_gib"] = self.health.apart_peak_gib
        if self.flops is not None:
            out.update(self.flops.summary(flops_per_token, tokens_per_s))
        if self.profiler.outputs:
            out["profile"] = dict(self.profiler.outputs)
        if self.profiler.top_line:
            out["top_kernels"] = self.profiler.top_line
        return out

    def finish(self, summary: dict[str, Any], model_dir: Path | None = None) -> None:
        """End of a run that returned normally (finished or preempted)."""
        self._end(summary, model_dir if self.cfg.logging.log_model else None, ok=True)

    def abort(self, error: BaseException) -> None:
        """Training raised: close the tracker runs as failed, still write the report."""
        if not self._done:
            self.event("error", -1, error=f"{type(error).__name__}: {error}")
            self._end(None, None, ok=False)

    def _end(self, summary: dict[str, Any] | None, model_dir: Path | None, ok: bool) -> None:
        self.profiler.close()
        if self._done or not self.is_main:
            self._done = True
            return
        self._done = True
        if summary is not None:
            self.event("end", int(summary.get("steps", 0)), interrupted=bool(summary.get("interrupted")))
        self.trackers.finish(summary, model_dir, ok)
        if summary is not None:
            summary["tracker_s"] = self.trackers.seconds
            summary["tracker_log_s"] = self.trackers.log_seconds
        if self.cfg.logging.report:
            self._write_report(summary)
        if summary is not None:
            summary["report_s"] = self.report_s

    def _write_report(self, summary: dict[str, Any] | None) -> None:
        from tunesmith.observe.report import write_report

        t0 = time.perf_counter()
        try:
            write_report([self.out_dir], self.out_dir / REPORT_FILE, live_summary=summary)
        except Exception as e:  # noqa: BLE001 - a report must never fail a finished run
            log.warning("could not write %s: %s: %s", self.out_dir / REPORT_FILE, type(e).__name__, e)
        self.report_s = time.perf_counter() - t0
