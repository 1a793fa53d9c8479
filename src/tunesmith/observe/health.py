"""GPU health for each metrics record: peak memory of the logging window, NVML utilisation/power.

On CUDA every record gets `mem_alloc_peak_gib` / `mem_reserved_peak_gib` (peaks since the
previous record; the allocator's peak counters are reset after each read) and `peak_mem_gib`
(the run's peak so far, as before). Instrumented steps (profiled, FLOP-counted) are kept apart
(`apart()`): the FLOP-counted step runs eagerly and the profiler adds its own buffers, so their
peak is reported as `profile_peak_mem_gib` and the windows carry on as if they had not run.
Where NVML is available (the `nvidia-ml-py` package, which
`torch.cuda.utilization` uses) also `gpu_util_pct` and `gpu_power_w`, sampled at the record. A
CPU run adds nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

log = logging.getLogger("tunesmith")
_GIB = 2**30


class DeviceHealth:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.run_peak_gib: float | None = None
        self.apart_peak_gib: float | None = None  # peak of the instrumented steps
        # The window's peaks (allocated, reserved) from before an instrumented step, whose
        # reset wiped the allocator's counters.
        self._floor = (0.0, 0.0)
        self._nvml = self.cuda  # switched off at the first failure (no pynvml, no permission)

    def _peaks(self) -> tuple[float, float]:
        """(allocated, reserved) peak GiB of the window so far, instrumented steps left out."""
        alloc = torch.cuda.max_memory_allocated(self.device) / _GIB
        reserved = torch.cuda.max_memory_reserved(self.device) / _GIB
        return max(alloc, self._floor[0]), max(reserved, self._floor[1])

    @contextmanager
    def apart(self, release: bool = False) -> Iterator[None]:
        """Around an instrumented step: its peak goes to `apart_peak_gib`, not the window's.

        The allocator's counters are read and reset on the host (no sync). `release`: empty the
        allocator's cache afterwards, so the eager FLOP-counted step's larger blocks do not stay
        reserved under the compiled steps (not for profiled steps: the next traced step would
        show the re-allocation)."""
        if not self.cuda:
            yield
            return
        before = self._peaks()
        torch.cuda.reset_peak_memory_stats(self.device)  # counters restart at the live memory
        try:
            yield
        finally:
            step_peak = torch.cuda.max_memory_allocated(self.device) / _GIB
            self.apart_peak_gib = max(step_peak, self.apart_peak_gib or 0.0)
            if release:
                torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._floor = before

    def window(self) -> dict[str, Any]:
        """The record's health fields; resets the window's peak counters."""
        if not self.cuda:
            return {}
        alloc, reserved = self._peaks()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._floor = (0.0, 0.0)
        self.run_peak_gib = max(alloc, self.run_peak_gib or 0.0)
        out: dict[str, Any] = {"peak_mem_gib": self.run_peak_gib, "mem_alloc_peak_gib": alloc,
                               "mem_reserved_peak_gib": reserved}
        out.update(self._nvml_sample())
        return out

    def run_peak(self) -> float | None:
        """The run's peak allocated GiB (including the steps since the last record)."""
        if not self.cuda:
            return None
        return max(self._peaks()[0], self.run_peak_gib or 0.0)

    def _nvml_sample(self) -> dict[str, Any]:
        if not self._nvml:
            return {}
        try:
            return {"gpu_util_pct": float(torch.cuda.utilization(self.device)),
                    "gpu_power_w": torch.cuda.power_draw(self.device) / 1000.0}  # mW -> W
        except Exception as e:  # noqa: BLE001 - ModuleNotFoundError (pynvml) or any NVML error
            log.info("GPU utilisation/power not logged: %s", e)
            self._nvml = False
            return {}
