"""Run one benchmark variant in a fresh subprocess (clean allocator, fair peak memory), and the
timing helpers the benchmark children share (`sync`, `reset_memory`).

The child prints one line `RESULT {json}`; anything else (or a non-zero exit) is a failure,
reported with the tail of its output so the table can say "failed" and the log says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_variant(script: str, variant: str, args: list[str]) -> dict:
    cmd = [sys.executable, script, "--variant", variant, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        error = (proc.stderr or proc.stdout)[-3000:]
        print(f"{variant} failed:\n{error}", file=sys.stderr)
        return {"error": error}
    return json.loads(line[0][len("RESULT "):])


def sync(device: str) -> None:
    """Wait for the GPU's queued work (timings around a step); nothing on CPU."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: str) -> float | None:
    """Clear the setup's leftovers, start peak tracking now; returns what the model holds (GiB)."""
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30
