"""Throughput, MFU and the metrics files.

MFU = achieved model FLOP/s / device peak, where model FLOPs per token are
6 * N_matmul + 12 * L * H * d_head * T (training: forward + backward; the second term is the
attention score and value matmuls at sequence length T). Recomputation from activation
checkpointing is not counted, so MFU does not reward extra work. Only training-step time
counts (see `Throughput`): evaluation, checkpoint saves and profiler export are timed apart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class Throughput:
    """Tokens/s and MFU of the training steps alone, over the steps after `warmup`.

    Time is read from a *train clock*: wall time minus every interval spent in `excluded()`
    (evaluation, checkpoint saves, profiler export, ...). So a slow eval or a checkpoint never
    lowers the reported rate; their own times are totalled in `excluded_s` by kind. On CUDA the
    device is synchronized when an excluded interval starts and ends, so queued training kernels
    are charged to training and eval kernels to eval (one sync per eval/save, not per step).
    """

    def __init__(self, warmup: int, flops_per_token: float, peak_tflops: float | None,
                 device: torch.device | None = None):
        self.warmup = warmup
        self.flops_per_token = flops_per_token
        self.peak = peak_tflops
        self.device = device
        self.steps = 0
        self.t0: float | None = None
        self.tokens = 0
        self.samples = 0
        self.excluded_s: dict[str, float] = {}
        self._paused = 0.0  # seconds spent in excluded intervals so far
        self._start = self.clock()
        # Since the last metrics record: the window rate next to the run average.
        self._win_t = self._start
        self._win_tokens = 0
        # A sliding window gives the progress bar a current rate rather than a run average.
        self._window: list[tuple[float, int]] = []

    def clock(self) -> float:
        """Seconds of training time: wall time less every excluded interval."""
        return time.perf_counter() - self._paused

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def excluded(self, kind: str) -> Iterator[None]:
        """Time spent inside is left out of throughput and added to `excluded_s[kind]`."""
        self._sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            dt = time.perf_counter() - t
            self._paused += dt
            self.excluded_s[kind] = self.excluded_s.get(kind, 0.0) + dt

    def step(self, tokens: int, samples: int, counted: bool = True) -> None:
        """End of one optimizer step. `counted=False`: an instrumented step (profiled, FLOP
        counted) whose time was excluded; its tokens are left out too."""
        now = self.clock()
        self.steps += 1
        if not counted:
            tokens = samples = 0
        self._win_tokens += tokens
        if self.steps == self.warmup + 1 and self.t0 is None:
            # Timing starts at the end of the last warm-up step; this step's work was done
            # before `now`, so it is counted from the previous mark, which we lack: start here
            # and count only the steps after it.
            self.t0 = now
        elif self.t0 is not None:
            self.tokens += tokens
            self.samples += samples
        self._window.append((now, tokens))
        self._window = self._window[-20:]

    def elapsed(self) -> float:
        """Training time since timing started (warm-up and excluded intervals left out)."""
        return self.clock() - self.t0 if self.t0 is not None else 0.0

    def train_s(self) -> float:
        """All training time of this run, warm-up steps included (for the time breakdown)."""
        return self.clock() - self._start

    def tokens_per_s(self) -> float | None:
        el = self.elapsed()
        return self.tokens / el if el > 0 and self.tokens else None

    def samples_per_s(self) -> float | None:
        """None, like tokens_per_s, when no step after the warm-up was timed (a short run);
        never a 0.0 that would read as a measurement."""
        el = self.elapsed()
        return self.samples / el if el > 0 and self.samples else None

    def pop_window(self) -> float | None:
        """Tokens/s of the training steps since the previous call (the logging window)."""
        now = self.clock()
        dt, tokens = now - self._win_t, self._win_tokens
        self._win_t, self._win_tokens = now, 0
        return tokens / dt if dt > 0 and tokens else None

    def recent_tokens_per_s(self) -> float | None:
        if len(self._window) < 2:
            return None
        dt = self._window[-1][0] - self._window[0][0]
        return sum(t for _, t in self._window[1:]) / dt if dt > 0 else None

    def mfu(self, tokens_per_s: float | None) -> float | None:
        if tokens_per_s is None or self.peak is None:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak * 1e12)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class MetricsWriter:
    """Appends one JSON object per line; flushed per record so a crash loses nothing written."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        # Disabled on ranks other than 0: one metrics file per job.
        self._f = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self._f is None:
            return
        clean = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


class LossWindow:
    """Sum and count of step losses since the last metrics record, kept on the device.

    Skipped (non-finite) steps are masked out without a host sync. The window is part of a
    checkpoint, so a resumed run logs the same averages as an uninterrupted one even when a
    checkpoint falls between two records.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        if ok is None:
            ok = torch.ones((), dtype=torch.bool, device=loss.device)
        value = torch.where(ok, loss, torch.zeros_like(loss))
        self.total = value if self.total is None else self.total + value
        self.count = ok.float() if self.count is None else self.count + ok.float()

    def pop_mean(self) -> float | None:
        """The mean over the window (None when every step in it was skipped); resets it."""
        if self.total is None or self.count is None:
            return None
        count = float(self.count)
        mean = float(self.total / self.count) if count > 0 else None
        self.total = self.count = None
        return mean

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        return {"total": cpu(self.total), "count": cpu(self.count)}

    def load_state_dict(self, sd: dict[str, torch.Tensor | None], device: torch.device | None = None) -> None:
        move = lambda t: None if t is None else t.to(device or t.device)  # noqa: E731
        self.total, self.count = move(sd.get("total")), move(sd.get("count"))
