"""PyTorch profiler traces, a CUDA memory snapshot of the traced steps, and the top-kernels line.

`profile.steps: [start, end]` (or llama-recipes' wait/warmup/active) traces optimizer steps
start..end on every rank: the profiler is created `warmup` steps before `start` (so steps before
that run with no profiler at all) and stopped after `end`, and exports
`PROFILE_DIR/trace_rank{R}_steps{start}-{end}.json` (Chrome trace format: chrome://tracing,
https://ui.perfetto.dev) plus `top_kernels_rank{R}.txt`, whose first line is also logged.
`profile.memory_snapshot` records CUDA allocator history over the same steps (or the first
`_SNAPSHOT_STEPS` without a window), writes `memory_snapshot_rank{R}.pickle`
(https://pytorch.org/memory_viz) after the last of them, and stops recording right there:
history recording slows every allocation, so no later step runs with it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from tunesmith.config.schema import ProfileConfig

log = logging.getLogger("tunesmith")
_SNAPSHOT_STEPS = 3  # without a trace window: the optimizer state appears at step 1, so 3 covers the peak
_SNAPSHOT_ENTRIES = 100_000  # allocator events kept in the snapshot's ring buffer
_GIB = 2**30


class CudaHistory:
    """The CUDA caching allocator's history recording (torch.cuda.memory's private API)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        torch.cuda.memory._record_memory_history(max_entries=_SNAPSHOT_ENTRIES)

    def stop(self) -> None:
        torch.cuda.memory._record_memory_history(enabled=None)

    def dump(self, path: Path) -> None:
        torch.cuda.memory._dump_snapshot(str(path))

    def peak_bytes(self) -> int:
        """Peak allocated since the counters were last reset (per step: `DeviceHealth.apart`)."""
        return torch.cuda.max_memory_allocated(self.device)


class StepProfiler:
    """Owns the profiler for one rank; driven by `before(step)` / `after(step)` around each step."""

    def __init__(self, cfg: ProfileConfig, out_dir: Path, rank: int, device: torch.device,
                 history: CudaHistory | None = None):
        self.cfg = cfg
        self.dir = Path(cfg.dir) if cfg.dir else out_dir / "profile"
        self.rank = rank
        self.device = device
        self.window = cfg.window
        self.warmup = min(cfg.warmup, self.window[0] - 1) if self.window else 0
        if history is None and device.type == "cuda":
            history = CudaHistory(device)
        self.history = history if cfg.memory_snapshot else None
        if cfg.memory_snapshot and self.history is None:
            log.warning("profile.memory_snapshot needs a CUDA device; skipped on %s", device.type)
        self._snap_steps = self.window or (1, _SNAPSHOT_STEPS)
        self._prof: profile | None = None
        self._recording = False
        self._peak: tuple[int, int] = (-1, 0)  # (bytes, step) of the recorded steps
        self._recorded = 0  # the last step recorded
        self.outputs: dict[str, str] = {}  # what was written, for summary.json
        self.top_line: str | None = None

    def watches(self, step: int) -> bool:
        """True for steps run under the profiler or allocator recording (left out of throughput)."""
        in_window = self.window is not None and self.window[0] - self.warmup <= step <= self.window[1]
        in_snap = self.history is not None and self._snap_steps[0] <= step <= self._snap_steps[1]
        return in_window or in_snap

    def before(self, step: int) -> None:
        if self.window is not None and step == self.window[0] - self.warmup:
            self._start_trace()
        if self.history is not None and step == self._snap_steps[0]:
            self.history.start()
            self._recording = True

    def after(self, step: int) -> None:
        if self._prof is not None:
            self._prof.step()  # exports through on_trace_ready after the last active step
            if step >= self.window[1]:
                self._prof.stop()
                self._prof = None
        if self._recording:
            self._peak = max(self._peak, (self.history.peak_bytes(), step))
            self._recorded = step
            if step >= self._snap_steps[1]:
                self.close()

    def close(self) -> None:
        """Stop anything still running; a run that ended or stopped inside the recorded steps
        still gets the snapshot of the steps it ran."""
        if self._prof is not None:
            self._prof.stop()
            self._prof = None
        if self._recording:
            try:
                if self._recorded:
                    self._write_snapshot()
            finally:
                self.history.stop()
                self._recording = False

    @property
    def recording(self) -> bool:
        """Whether allocator history is being recorded now."""
        return self._recording

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

    def _write_snapshot(self) -> None:
        """After the last recorded step: the history covers every recorded step, the peak
        one included (memory_viz's timeline shows it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"memory_snapshot_rank{self.rank}.pickle"
        self.history.dump(path)
        first, last = self._snap_steps[0], self._recorded
        peak, at = self._peak
        self.outputs.update({"memory_snapshot": str(path), "memory_snapshot_steps": f"{first}-{last}",
                             "memory_snapshot_peak_step": str(at),
                             "memory_snapshot_peak_gib": f"{peak / _GIB:.3f}"})


# CUPTI/Kineto records that take time on a timeline but are no GPU work: the profiler's own
# overhead ("Command Buffer Full": the launch queue was full), lazy module loading, and the
# synchronisation records (CUDA_SYNC activities count as device events).
_NOT_KERNELS = ("Command Buffer Full", "Lazy Function Loading", "Activity Buffer Request",
                "Stream Wait Event", "Event Sync", "Stream Sync", "Context Sync")
_NAME_CAP = 60  # characters of a kernel name in the one-line summary
# Wrapper kernels whose name says nothing without their first template argument.
_GENERIC = {"Kernel", "Kernel2", "kernel", "device_kernel"}


def _is_work(name: str) -> bool:
    return not (name in _NOT_KERNELS or name.startswith(("CUPTI", "ProfilerStep", "cuda")))


def ranked_ops(events: Any, cuda: bool) -> list[tuple[str, float, int]]:
    """(name, self time in microseconds, calls), longest first. On CUDA `events` are the
    profiler's events (`prof.events()`) and the ranking holds the device's kernels, copies and
    memsets (no annotations, runtime calls or CUPTI markers); on CPU they are
    `prof.key_averages()` and it holds the operators by self CPU time."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    if cuda:
        keep = lambda e: e.device_type == DeviceType.CUDA  # noqa: E731
        micros = lambda e: float(e.device_time_total)  # noqa: E731 - its own span on the device
    else:
        keep = lambda e: e.device_type == DeviceType.CPU  # noqa: E731
        micros = lambda e: float(e.self_cpu_time_total)  # noqa: E731
    for e in events:
        if not keep(e) or getattr(e, "is_user_annotation", False) or not _is_work(e.key):
            continue
        total = totals[e.key]
        total[0] += micros(e)
        total[1] += getattr(e, "count", 1)
    ranked = [(name, t, int(n)) for name, (t, n) in totals.items() if t > 0]
    return sorted(ranked, key=lambda r: r[1], reverse=True)


def short_name(name: str, cap: int = _NAME_CAP) -> str:
    """A demangled C++ kernel name as a reader wants it: no return type, template arguments or
    parameter list ('void at::native::elementwise_kernel<128, 2, ...>(int, ...)' ->
    'at::native::elementwise_kernel'); a generic wrapper keeps its first template argument
    ('cutlass::Kernel2<cutlass_80_tensorop_...>'). At most `cap` characters."""
    text = name.strip().replace("(anonymous namespace)::", "")
    text = text.removeprefix("## ").removesuffix(" ##")  # inductor's "## Call CompiledFxGraph h ##"
    text = text.removeprefix("void ")
    base, arg, depth, arg_done = [], [], 0, False
    for ch in text:
        if ch == "(" and depth == 0:
            break  # the parameter list
        if ch in "<>":
            depth = depth + 1 if ch == "<" else max(depth - 1, 0)
            arg_done = arg_done or (ch == ">" and depth == 0)
        elif depth == 0:
            base.append(ch)
        elif depth == 1 and not arg_done:
            arg_done = ch == ","
            arg += [] if arg_done else [ch]
    out, first = "".join(base).strip(), "".join(arg).strip()
    if out.rsplit("::", 1)[-1] in _GENERIC and first:
        out = f"{out}<{first}>"
    return out if len(out) <= cap else out[: cap - 3] + "..."


def top_kernels(prof: profile, n: int, cuda: bool) -> tuple[str, str]:
    """(the saved text, the one line 'top kernels by <device> time: name share (ms), ...').

    The line shortens names (`short_name`); the text lists every kernel with its full name,
    then torch's key_averages table."""
    ranked = ranked_ops(prof.events() if cuda else prof.key_averages(), cuda)
    total = sum(t for _, t, _ in ranked) or 1.0
    parts = [f"{short_name(name)} {100 * t / total:.1f}% ({t / 1000:.1f} ms)" for name, t, _ in ranked[:n]]
    where = "GPU" if cuda else "CPU"
    line = f"top kernels by {where} time: " + ", ".join(parts)
    rows = [f"{'share':>6} {'ms':>10} {'calls':>7}  name (all {len(ranked)} {where} kernels, full names)"]
    rows += [f"{100 * t / total:5.1f}% {t / 1000:10.3f} {calls:7d}  {name}" for name, t, calls in ranked]
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=max(n, 30), max_name_column_width=120)
    return "\n".join(rows) + "\n\n" + table, line
