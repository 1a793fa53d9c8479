"""Run Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1).

CUDA builds of torch ship Triton; this CPU machine does not, so `.ci/run` installs Triton into
`.triton-interp/` (outside the venv, so nothing else in the suite imports it). Kernel tests run
their checks in a subprocess with that directory on the path, or skip with the reason."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTERP_DIR = ROOT / ".triton-interp"


def _triton_path() -> str | None:
    if importlib.util.find_spec("triton") is not None:
        return ""
    if (INTERP_DIR / "triton").is_dir():
        return str(INTERP_DIR)
    return None


def run_interpreted(code: str, timeout: int = 300) -> str:
    """Runs `code` in a fresh interpreter with TRITON_INTERPRET=1; returns its stdout, fails the
    test with its stderr when it exits non-zero, skips when Triton is not installed."""
    extra = _triton_path()
    if extra is None:
        pytest.skip("Triton is not installed here (.ci/run installs it into .triton-interp/)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout
