"""Launching torchrun from tests, and the tiny-model overrides the distributed tests share."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The suite is the CPU/gloo parity suite, pinned to CPU so a GPU machine runs the same thing.
# TUNESMITH_TEST_DEVICE=cuda runs it on CUDA/NCCL instead (the GPU parity check; one GPU a rank).
TEST_DEVICE = os.environ.get("TUNESMITH_TEST_DEVICE", "cpu")


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # Prepend, never replace: an existing PYTHONPATH may carry dependencies (GPU machines).
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")) if p
    )
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


def gpus_present(device: str = TEST_DEVICE) -> int | None:
    """GPUs the ranks can take, one each; None for the CPU (gloo) suite, where any count runs."""
    if device != "cuda":
        return None
    import torch

    return torch.cuda.device_count()


def can_launch(nproc: int, device: str = TEST_DEVICE) -> bool:
    have = gpus_present(device)
    return have is None or have >= nproc


def skip_unless_ranks(nproc: int, device: str = TEST_DEVICE) -> None:
    """Skip (with the reason) a test that needs more GPUs than this machine has."""
    if not can_launch(nproc, device):
        pytest.skip(f"needs {nproc} GPUs (one per rank), {gpus_present(device)} present")


def torchrun(nproc: int, args: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    skip_unless_ranks(nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), "--monitor-interval", "0.2", *args]
    return subprocess.run(cmd, cwd=REPO, env=worker_env(**env), capture_output=True, text=True,
                          timeout=timeout)


class RankPool:
    """One torchrun launch of `nproc` ranks (tests/distributed/_worker.py) that runs every
    run_jobs batch of the session in turn, so the ranks' start (torchrun, imports, the process
    group: ~13 s for 2 ranks, ~20 s for 4 on 2 cores) is paid once, not once per test file.
    tests/distributed/conftest.py closes the pools when the package's tests are done."""

    def __init__(self, nproc: int) -> None:
        self.nproc, self.batches = nproc, 0
        self.dir = Path(tempfile.mkdtemp(prefix=f"tunesmith-ranks{nproc}-"))
        self.log = (self.dir / "torchrun.log").open("wb")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(nproc), "--monitor-interval", "0.2", str(REPO / "tests/distributed/_worker.py"),
               str(self.dir)]
        env = worker_env(TUNESMITH_TEST_PARENT=str(os.getpid()))
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def run(self, jobs: list[list[str]], timeout: float) -> str | None:
        """Run one batch on every rank; None when all ranks finished it with exit code 0, else
        what went wrong with the ranks' output during this batch (the pool is then closed)."""
        i, self.batches = self.batches, self.batches + 1
        start = (self.dir / "torchrun.log").stat().st_size
        (self.dir / f"{i}.json.tmp").write_text(json.dumps(jobs))
        (self.dir / f"{i}.json.tmp").rename(self.dir / f"{i}.json")
        rcs = [self.dir / f"{i}.rank{r}.rc" for r in range(self.nproc)]
        deadline = time.monotonic() + timeout
        while not all(f.exists() for f in rcs):
            if self.proc.poll() is not None:
                why = f"the ranks exited (torchrun exit code {self.proc.returncode})"
                break
            if time.monotonic() > deadline:
                why = f"timed out after {timeout:.0f} s"
                break
            time.sleep(0.05)
        else:
            codes = [int(f.read_text()) for f in rcs]
            if not any(codes):
                return None
            why = f"exit codes per rank {codes}"
        output = (self.dir / "torchrun.log").read_bytes()[start:].decode(errors="replace")
        self.close(wait_s=10)
        return f"{self.nproc}-rank batch {i} failed: {why}\n{output[-4000:]}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, wait_s: float = 60) -> None:
        if self.alive():
            (self.dir / f"{self.batches}.json.tmp").write_text("null")
            (self.dir / f"{self.batches}.json.tmp").rename(self.dir / f"{self.batches}.json")
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:  # a rank is stuck: torchrun ends its ranks on SIGTERM
                self.proc.terminate()
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_POOLS: dict[int, RankPool] = {}


def close_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close()


def run_jobs(nproc: int, jobs: list[list[str]], timeout: float = 240) -> None:
    """Run `jobs` (lists of `train` overrides, each naming its output.dir) in turn on `nproc`
    ranks, in the session's pool of that size; a failure names the batch's scenarios and shows
    the ranks' output (the failing one: "scenario NAME failed")."""
    skip_unless_ranks(nproc)
    pool = _POOLS.get(nproc)
    if pool is None or not pool.alive():
        pool = _POOLS[nproc] = RankPool(nproc)
    error = pool.run(jobs, timeout)
    if error is not None:
        del _POOLS[nproc]
        names = [Path(a.split("=", 1)[1]).name for j in jobs for a in j if a.startswith("output.dir=")]
        raise AssertionError(f"scenarios {names}: {error}")


def model_overrides(tied: bool) -> str:
    return ("model.overrides={vocab_size: 512, dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, "
            f"intermediate_size: 128, max_position_embeddings: 512, tie_word_embeddings: {str(tied).lower()}}}")


def save_init(out: Path, tied: bool = True, seed: int = 123, preset: str = "tiny",
              overrides: str | None = None) -> Path:
    """A seeded random model saved in HF format: runs that load it start identical on any
    device (GPU runs included, where sharded random init is not bitwise the one-device init)."""
    from tunesmith.config.loader import parse_override
    from tunesmith.models import build_model, init_random, resolve_model_config, save_pretrained

    spec = parse_override(overrides or model_overrides(tied))[1]
    family, cfg = resolve_model_config(preset, spec)
    model = init_random(build_model(family, cfg, "meta"), "cpu", "float32", seed)
    return save_pretrained(model, family, cfg, out)


def job(tok: Path, train: Path, valid: Path, out: Path, *, global_batch: int = 8, dp: int = 1,
        tied: bool = True, steps: int = 4, extra: tuple[str, ...] = (),
        init: Path | None = None) -> list[str]:
    """Overrides for a few steps of a ~100K-param Llama; the global batch is fixed, so every
    layout sees the same samples per step (micro-batch = global / dp). `init`: start from that
    saved model (streamed into the shards) instead of the seeded from-scratch init."""
    model = (f"model.name={init}",) if init is not None else ("model.name=tiny", model_overrides(tied))
    return [
        *model, f"model.tokenizer={tok}",
        f"data.path={train}", f"data.validation_path={valid}", "data.block_size=64",
        f"train.micro_batch_size={global_batch // dp}", "train.precision=fp32",
        f"train.max_steps={steps}", "logging.steps=1", "logging.progress=false",
        "optim.lr=3e-3", "schedule.warmup_steps=2", "eval.max_batches=2",
        f"output.dir={out}", f"train.device={TEST_DEVICE}", *extra,
    ]


def losses(out: Path) -> list[tuple[float, float]]:
    """(loss, grad_norm) per logged step of a run directory."""
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in recs if "loss" in r]


GPT2_OVERRIDES = "model.overrides={vocab_size: 512}"


def resume_jobs(data: tuple[Path, Path, Path], root: Path, extra: tuple[str, ...], init: Path,
                dp: int = 2) -> list[list[str]]:
    """An uninterrupted 6-step run (root/resume_full) and one stopped at 3 and resumed to 6
    (root/resume_part); `extra` must checkpoint every 3 steps with a constant schedule."""
    return [
        job(*data, root / "resume_full", dp=dp, steps=6, extra=extra, init=init),
        job(*data, root / "resume_part", dp=dp, steps=3, extra=extra, init=init),
        job(*data, root / "resume_part", dp=dp, steps=6, init=init, extra=(*extra, "checkpoint.resume=auto")),
    ]


def assert_resumed_exactly(root: Path, loss_atol: float, grad_rtol: float) -> list[str]:
    """The resumed run of `resume_jobs` matches the uninterrupted one step by step; returns
    the model keys its sharded checkpoint holds."""
    from torch.distributed.checkpoint import FileSystemReader

    full, part = losses(root / "resume_full"), losses(root / "resume_part")
    assert len(full) == len(part) == 6
    for step, ((l, g), (l0, g0)) in enumerate(zip(part, full, strict=True), 1):
        assert abs(l - l0) < loss_atol, f"step {step} loss {l} vs {l0}"
        assert abs(g - g0) <= grad_rtol * g0, f"step {step} grad norm {g} vs {g0}"
    summary = json.loads((root / "resume_part" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_00000003")
    ckpt = root / "resume_part" / "checkpoints" / "step_00000003"
    return list(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
