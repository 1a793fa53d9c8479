"""CPU threads: how many CPUs this process may use, and process-wide defaults that keep torch's
OpenMP threads, the `tokenizers` (Rust rayon) pool and `datasets` workers from fighting over them.

Why (issue #17): on a busy machine, OpenMP threads that finish a parallel region first
spin-wait for a sibling the kernel has descheduled, so user CPU time balloons and the demo took
9-33 min instead of ~2. Waiting passively fixes that (benchmarks/cpu_threads.py measures it).

`process_defaults()` only fills in variables the user has not set, and must run before torch,
tokenizers or datasets are imported (OpenMP and those libraries read them once, at load).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import MutableMapping
from pathlib import Path

# cgroup v2 CPU quota of this container: "max 100000" (none) or "<quota> <period>".
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")

log = logging.getLogger("tunesmith")
_CAPPED: set[int] = set()
_DEFAULTED: set[str] = set()  # keys apply_process_defaults set in this process


def cpu_budget() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota.

    `os.cpu_count()` reports the host's CPUs; a container limited to 2 CPUs on a 64-core host
    would otherwise start 64 OpenMP threads (torch's default) and thrash.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity API
        cpus = os.cpu_count() or 1
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible
    return max(1, cpus)


def process_defaults(stderr_is_tty: bool, cpus: int | None = None) -> dict[str, str]:
    """Environment defaults for a `tunesmith` process (see the module docstring)."""
    cpus = cpu_budget() if cpus is None else cpus
    env = {
        # Idle OpenMP threads sleep instead of spinning: on a shared CPU the spinning thread
        # steals the time slice of the one it waits for. (libgomp and LLVM's libomp read this.)
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    if cpus < (os.cpu_count() or cpus):
        # torch and rayon size their pools from the host's CPU count, not our share of it.
        env.update(OMP_NUM_THREADS=str(cpus), RAYON_NUM_THREADS=str(cpus))
    if not stderr_is_tty:
        # tqdm bars redraw with \r; in a log file or pipe they become one endless line.
        env.update(HF_DATASETS_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return env


def apply_process_defaults(environ: MutableMapping[str, str], stderr_is_tty: bool) -> None:
    """Set each default of `process_defaults` that the user has not set already."""
    for key, value in process_defaults(stderr_is_tty).items():
        if key not in environ:
            environ[key] = value
            _DEFAULTED.add(key)


def user_set(key: str, environ: MutableMapping[str, str] = os.environ) -> bool:
    """True when `key` is in the environment and came from the user, not our defaults."""
    return key in environ and key not in _DEFAULTED


def tokenizer_workers(num_proc: int, n_records: int) -> int | None:
    """`datasets.map(num_proc=...)` for tokenising: at most one worker per CPU we may use.

    With several workers each tokenizes single-threaded (TOKENIZERS_PARALLELISM=false), so
    workers x rayon threads never exceeds the budget. None = in this process.
    """
    cpus = cpu_budget()
    if num_proc > cpus and num_proc not in _CAPPED:  # said once (train and validation both ask)
        _CAPPED.add(num_proc)
        log.info("data.num_proc=%d but this process may use %d CPUs: tokenizing with %d workers",
                 num_proc, cpus, cpus)
    workers = min(num_proc, cpus, n_records)
    if workers <= 1:
        return None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return workers
