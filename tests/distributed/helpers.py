"""Launching torchrun from tests, and the tiny-model overrides the distributed tests share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def run_jobs(nproc: int, jobs: list[list[str]], tmp: Path) -> subprocess.CompletedProcess:
    f = tmp / f"jobs-{nproc}.json"
    f.write_text(json.dumps(jobs))
    proc = torchrun(nproc, [str(REPO / "tests/distributed/_worker.py"), str(f)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


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
