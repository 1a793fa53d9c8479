"""PyTorch profiler traces, a CUDA memory snapshot at the peak step, and the top-kernels line.

`profile.steps: [start, end]` (or llama-recipes' wait/warmup/active) traces optimizer steps
start..end on every rank: the profiler is created `warmup` steps before `start` (so steps before
that run with no profiler at all), and exports `OUTPUT/profile/trace_rank{R}_steps{start}-{end}.json`
(Chrome trace format: chrome://tracing, https://ui.perfetto.dev) plus `top_kernels_rank{R}.txt`,
whose first line is also logged. `profile.memory_snapshot` records CUDA allocator history over the
same steps (or the first `_SNAPSHOT_STEPS` without a window) and dumps
`memory_snapshot_rank{R}.pickle` (https://pytorch.org/memory_viz) whenever a step sets a new peak.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from tunesmith.config.schema import ProfileConfig

log = logging.getLogger("tunesmith")
_SNAPSHOT_STEPS = 3  # without a trace window: the optimizer state appears at step 1, so 3 covers the peak
_SNAPSHOT_ENTRIES = 100_000  # allocator events kept in the snapshot's ring buffer


class StepProfiler:
    """Owns the profiler for one rank; driven by `before(step)` / `after(step)` around each step."""

    def __init__(self, cfg: ProfileConfig, out_dir: Path, rank: int, device: torch.device):
        self.cfg = cfg
        self.dir = out_dir / "profile"
        self.rank = rank
        self.device = device
        self.window = cfg.window
        self.warmup = min(cfg.warmup, self.window[0] - 1) if self.window else 0
        self.snapshot = cfg.memory_snapshot and device.type == "cuda"
        if cfg.memory_snapshot and not self.snapshot:
            log.warning("profile.memory_snapshot needs a CUDA device; skipped on %s", device.type)
        self._snap_steps = self.window or (1, _SNAPSHOT_STEPS)
        self._prof: profile | None = None
        self._recording = False
        self._peak = -1
        self.outputs: dict[str, str] = {}  # what was written, for summary.json
        self.top_line: str | None = None

    def watches(self, step: int) -> bool:
        """True for steps run under the profiler or allocator recording (left out of throughput)."""
        in_window = self.window is not None and self.window[0] - self.warmup <= step <= self.window[1]
        in_snap = self.snapshot and self._snap_steps[0] <= step <= self._snap_steps[1]
        return in_window or in_snap

    def before(self, step: int) -> None:
        if self.window is not None and step == self.window[0] - self.warmup:
            self._start_trace()
        if self.snapshot and step == self._snap_steps[0]:
            torch.cuda.memory._record_memory_history(max_entries=_SNAPSHOT_ENTRIES)
            self._recording = True

    def after(self, step: int) -> None:
        if self._prof is not None:
            self._prof.step()  # exports through on_trace_ready after the last active step
            if step >= self.window[1]:
                self._prof.stop()
                self._prof = None
        if self._recording:
            self._snapshot_if_peak(step)
            if step >= self._snap_steps[1]:
                self.close()

    def close(self) -> None:
        """Stop anything still running (a run that ended or stopped inside the window)."""
        if self._prof is not None:
            self._prof.stop()
            self._prof = None
        if self._recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording = False

    def _start_trace(self) -> None:
        start, end = self.window
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=self.warmup, active=end - start + 1, repeat=1),
            on_trace_ready=self._export, record_shapes=self.cfg.record_shapes,
            with_stack=self.cfg.with_stack, profile_memory=self.cfg.profile_memory,
        )
        self._prof.start()

    def _export(self, prof: profile) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        start, end = self.window
        trace = self.dir / f"trace_rank{self.rank}_steps{start}-{end}.json"
        prof.export_chrome_trace(str(trace))
        self.outputs["trace"] = str(trace)
        table, self.top_line = top_kernels(prof, self.cfg.top_kernels, self.device.type == "cuda")
        text = self.dir / f"top_kernels_rank{self.rank}.txt"
        text.write_text(self.top_line + "\n\n" + table + "\n", encoding="utf-8")
        self.outputs["top_kernels"] = str(text)
        if self.rank == 0:
            log.info("profile: %s (trace %s)", self.top_line, trace)

    def _snapshot_if_peak(self, step: int) -> None:
        peak = torch.cuda.max_memory_allocated(self.device)
        if peak <= self._peak:
            return
        self._peak = peak
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"memory_snapshot_rank{self.rank}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        self.outputs["memory_snapshot"] = str(path)
        self.outputs["memory_snapshot_step"] = str(step)
        self.outputs["memory_snapshot_peak_gib"] = f"{peak / 2**30:.3f}"


def top_kernels(prof: profile, n: int, cuda: bool) -> tuple[str, str]:
    """(key_averages table, one line 'top kernels by <device> time: name share (ms), ...')."""
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    table = events.table(sort_by=sort, row_limit=n)

    def self_time(e) -> float:  # microseconds
        return float(e.self_device_time_total if cuda else e.self_cpu_time_total)

    # ProfilerStep#N spans the whole step: a label, not a kernel.
    ops = [e for e in events if not e.key.startswith("ProfilerStep")]
    ranked = sorted(ops, key=self_time, reverse=True)
    total = sum(self_time(e) for e in ops) or 1.0
    parts = [f"{e.key} {100 * self_time(e) / total:.1f}% ({self_time(e) / 1000:.1f} ms)"
             for e in ranked[:n] if self_time(e) > 0]
    where = "GPU" if cuda else "CPU"
    return table, f"top kernels by {where} time: " + ", ".join(parts)
