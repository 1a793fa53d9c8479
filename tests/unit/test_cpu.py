"""CPU budget and the process defaults that keep thread pools from fighting (issue #17)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO
from tunesmith import cpu


def test_cpu_budget_follows_a_cgroup_quota(tmp_path, monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(cpu, "_CGROUP_CPU_MAX", quota)
    quota.write_text("max 100000\n")
    assert cpu.cpu_budget() == affinity
    quota.write_text("50000 100000\n")  # half a CPU still gets one thread
    assert cpu.cpu_budget() == 1
    quota.write_text(f"{100000 * affinity + 1} 100000\n")  # above the affinity mask: the mask
    assert cpu.cpu_budget() == affinity
    quota.unlink()  # no cgroup v2 file
    assert cpu.cpu_budget() == affinity


def test_process_defaults():
    host = os.cpu_count() or 1
    env = cpu.process_defaults(stderr_is_tty=True, cpus=host)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}  # the whole host: pools size themselves
    off_tty = cpu.process_defaults(stderr_is_tty=False, cpus=host)
    assert off_tty["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    assert off_tty["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    if host > 1:  # a share of the host: torch and rayon are told
        share = cpu.process_defaults(stderr_is_tty=True, cpus=host - 1)
        assert share["OMP_NUM_THREADS"] == share["RAYON_NUM_THREADS"] == str(host - 1)


def test_user_settings_win(monkeypatch):
    monkeypatch.setattr(cpu, "_DEFAULTED", set())
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    cpu.apply_process_defaults(env, stderr_is_tty=False)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and env["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    assert cpu.user_set("OMP_WAIT_POLICY", env)
    assert not cpu.user_set("HF_DATASETS_DISABLE_PROGRESS_BARS", env)  # our default
    assert not cpu.user_set("NOT_SET_ANYWHERE", env)


def test_tokenizer_workers_stay_within_the_budget(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_budget", lambda: 2)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    assert cpu.tokenizer_workers(1, 1000) is None
    assert "TOKENIZERS_PARALLELISM" not in os.environ  # one process: its rayon pool may work
    assert cpu.tokenizer_workers(8, 1000) == 2
    assert cpu.tokenizer_workers(8, 1) is None
    # Several worker processes: each tokenizes single-threaded.
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_cli_module_loads_no_thread_pool_library():
    """The defaults only work if the `tunesmith` entry point sets them before torch,
    tokenizers or datasets load: importing the CLI module must not load them."""
    code = ("import sys, tunesmith.cli.main; "
            "print(sorted(m for m in ('torch', 'tokenizers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.stdout.strip() == "[]"

