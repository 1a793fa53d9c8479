"""Checkpoints that never lose work: exact resume, preemption, fallbacks, config checks, NaN
guard, disk checks and export -- all through the real CLI on a ~100K-param Llama (fp32, CPU)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from tunesmith.checkpoint import CheckpointManager
from tunesmith.cli.main import run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One intra-op thread here and in child processes: a model this small gains nothing from
    more, and a busy 2-core machine makes OpenMP barriers spin. Bitwise comparisons hold for a
    fixed thread count, so parent and children must agree."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ov(tiny_tokenizer_dir: Path, demo_text: tuple[Path, Path]):
    """overrides(out_dir, **extra): tiny recipe, a record every step, constant LR after warmup
    (so runs of different lengths share their first steps), no final eval."""

    def make(out: Path, **extra: Any) -> list[str]:
        base = {"logging.steps": 1, "eval.at_end": "false", "schedule.name": "constant",
                "schedule.warmup_steps": 2, "data.max_train_samples": 400, "data.block_size": 32,
                "train.micro_batch_size": 4}
        return tiny_overrides(tiny_tokenizer_dir, out, demo_text[0], **{**base, **extra})

    return make


def train(argv: list[str]) -> int:
    return run(["-q", "train", *argv])


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"duplicate step records in {out}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def final_params(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k  # the live model may be on a GPU


def summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


# ----------------------------------------------------------------------------- exactness


def test_stop_at_n_then_resume_to_2n_is_bitwise_identical(tmp_path: Path, ov) -> None:
    n = 6
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(ov(straight, **{"train.max_steps": 2 * n})) == 0
    assert train(ov(split, **{"train.max_steps": n, "checkpoint.every_steps": n})) == 0
    ckpt = split / "checkpoints" / f"step_{n:08d}"
    for name in ("manifest.json", "config.yaml", ".metadata", "hf/config.json", "hf/tokenizer.json"):
        assert (ckpt / name).is_file(), name
    listed = {f["path"] for f in json.loads((ckpt / "manifest.json").read_text())["files"]}
    assert {"hf/config.json", "hf/tokenizer.json", "config.yaml"} <= listed

    # Same dir, no overwrite needed; max_steps extended; metrics appended.
    assert train(ov(split, **{"train.max_steps": 2 * n, "checkpoint.every_steps": n,
                              "checkpoint.resume": "auto"})) == 0
    assert losses(split) == losses(straight)
    assert sorted(losses(split)) == list(range(1, 2 * n + 1))
    assert_same(final_params(split), final_params(straight))
    s = summary(split)
    assert s["resumed_from"] == str(ckpt) and s["steps"] == 2 * n
    assert s["tokens_seen"] == summary(straight)["tokens_seen"]


def test_mid_epoch_resume_with_grad_accumulation(tmp_path: Path, ov) -> None:
    # 30 blocks / 4 per micro-batch = 7 micro-batches; k=2 -> 3 steps per epoch, 1 left over.
    extra = {"data.max_train_samples": 30, "train.micro_batch_size": 4, "train.grad_accum_steps": 2,
             "train.max_steps": 10, "schedule.name": "cosine", "checkpoint.every_steps": 4,
             "checkpoint.every_epoch": "true", "checkpoint.keep_last": "null"}
    ref = tmp_path / "ref"
    assert train(ov(ref, **extra)) == 0
    saved = [CheckpointManager.step_of(p) for p in CheckpointManager(ref).list_complete()]
    assert saved == [3, 4, 6, 8, 9, 10]  # epoch ends 3, 6, 9; every 4; the last step
    expected = losses(ref)
    for step in (4, 6):  # mid-epoch, and exactly at an epoch boundary
        out = tmp_path / f"from_{step}"
        resume = str(ref / "checkpoints" / f"step_{step:08d}")
        assert train(ov(out, **{**extra, "checkpoint.resume": resume})) == 0
        got = losses(out)
        assert got == {k: v for k, v in expected.items() if k > step}
        assert_same(final_params(out), final_params(ref))


# ----------------------------------------------------------------------------- preemption


def _spawn(argv: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "child.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunesmith", "train", *argv], cwd=REPO,
        stdout=open(tmp_path / "child.out", "w"), stderr=open(log, "w"),
    )
    return proc, log


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(tmp_path: Path, ov) -> None:
    out = tmp_path / "killed"
    proc, _ = _spawn(ov(out, **{"train.max_steps": 1000, "checkpoint.every_steps": 3}), tmp_path)
    first = out / "checkpoints" / "step_00000003"
    _wait_for(lambda: (first / "manifest.json").exists(), proc, "the first checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = CheckpointManager(out).latest_complete()
    assert latest is not None
    stop = CheckpointManager.step_of(latest) + 3
    assert train(ov(out, **{"train.max_steps": stop, "checkpoint.every_steps": 3,
                            "checkpoint.resume": "auto"})) == 0
    assert not list((out / "checkpoints").glob(".tmp-*"))  # a save cut by the kill is cleaned up
    ref = tmp_path / "ref"
    assert train(ov(ref, **{"train.max_steps": stop})) == 0
    assert losses(out) == losses(ref)
    assert_same(final_params(out), final_params(ref))


def test_sigterm_checkpoints_and_exits_zero(tmp_path: Path, ov) -> None:
    out = tmp_path / "run"
    proc, log = _spawn(ov(out, **{"train.max_steps": 1000}), tmp_path)
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, proc, "two steps")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    err = log.read_text()
    assert "stopped by SIGTERM" in err and "checkpoint.resume=auto" in err, err
    s = summary(out)
    assert s["interrupted"] is True and s["stopped_by"] == "SIGTERM" and "final_model" not in s
    assert not (out / "final").exists()
    step = s["steps"]
    assert s["checkpoint"] == str(out / "checkpoints" / f"step_{step:08d}")
    assert train(ov(out, **{"train.max_steps": step + 2, "checkpoint.resume": "auto"})) == 0
    assert sorted(losses(out)) == list(range(1, step + 3))
    assert summary(out)["interrupted"] is False and (out / "final" / "model.safetensors").exists()


def _with_hook(monkeypatch: pytest.MonkeyPatch, hook) -> list:
    """Attach `hook(trainer, loss, grad_norm)` to the trainer the CLI builds; returns [trainer]."""
    import tunesmith.train.setup as setup_mod

    real, built = setup_mod._make_trainer, []

    def make(*args: Any, **kwargs: Any):
        trainer = real(*args, **kwargs)
        trainer.hooks.append(hook)
        built.append(trainer)
        return trainer

    monkeypatch.setattr(setup_mod, "_make_trainer", make)
    return built


def test_second_signal_aborts_at_once(tmp_path: Path, ov, monkeypatch: pytest.MonkeyPatch) -> None:
    before = signal.getsignal(signal.SIGINT)

    def twice(trainer, loss, grad_norm) -> None:
        if trainer.progress.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    _with_hook(monkeypatch, twice)
    out = tmp_path / "run"
    assert train(ov(out, **{"train.max_steps": 50})) == 130
    assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is before


# ----------------------------------------------------------------------------- robustness


def test_corrupt_newest_checkpoint_falls_back(tmp_path: Path, ov, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    assert train(ov(out, **{"train.max_steps": 4, "checkpoint.every_steps": 2})) == 0
    newest = out / "checkpoints" / "step_00000004"
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated, as by a full disk
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        assert train(ov(out, **{"train.max_steps": 6, "checkpoint.every_steps": 2,
                                "checkpoint.resume": "auto"})) == 0
    assert "skipping checkpoint" in caplog.text and "step_00000004" in caplog.text
    assert summary(out)["resumed_from"].endswith("step_00000002")
    assert sorted(losses(out)) == list(range(1, 7))


def test_keep_last_survives_an_interrupted_save(tmp_path: Path, ov, monkeypatch: pytest.MonkeyPatch) -> None:
    import tunesmith.checkpoint.manager as manager_mod

    out = tmp_path / "run"
    real, calls = manager_mod.dcp.save, []

    def crash_on_third(state: dict, *, checkpoint_id: Path) -> None:
        calls.append(checkpoint_id)
        real(state, checkpoint_id=checkpoint_id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed mid-save
    monkeypatch.setattr(manager_mod.dcp, "save", crash_on_third)
    argv = ov(out, **{"train.max_steps": 8, "checkpoint.every_steps": 2, "checkpoint.keep_last": 1})
    assert train(argv) == 130
    monkeypatch.undo()
    mgr = CheckpointManager(out, keep_last=1)
    assert [p.name for p in mgr.list_complete()] == ["step_00000004"]
    assert len(list((out / "checkpoints").glob(".tmp-*"))) == 1
    assert train([*argv, "checkpoint.resume=auto"]) == 0
    assert [p.name for p in mgr.list_complete()] == ["step_00000008"]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_resume_refuses_a_different_run(tmp_path: Path, ov, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert train(ov(out, **{"train.max_steps": 4, "checkpoint.every_steps": 4})) == 0
    capsys.readouterr()
    for change, key in ((("train.micro_batch_size", 2), "train.micro_batch_size (checkpoint: 4, now: 2)"),
                        (("data.block_size", 16), "data.block_size (checkpoint: 32, now: 16)")):
        argv = ov(out, **{"train.max_steps": 6, "checkpoint.resume": "auto", change[0]: change[1]})
        assert train(argv) == 2
        err = capsys.readouterr().err
        assert key in err and err.count("\n") == 1, err
    ckpt = str(out / "checkpoints" / "step_00000004")
    for resume, msg in ((str(tmp_path / "nope"), "does not exist"), (str(tmp_path), "missing manifest.json"),
                        ("7", "no checkpoint for step 7")):
        assert train(ov(tmp_path / "other", **{"checkpoint.resume": resume})) == 2
        assert msg in capsys.readouterr().err
    assert train(ov(tmp_path / "short", **{"train.max_steps": 3, "checkpoint.resume": ckpt})) == 2
    assert "train.max_steps >= 4" in capsys.readouterr().err
    # Harmless changes are fine, and a new learning rate takes effect (constant schedule).
    assert train(ov(out, **{"train.max_steps": 5, "checkpoint.resume": "auto", "optim.lr": 0.01,
                            "logging.steps": 5, "eval.every_steps": 5})) == 0
    assert [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["step"] == 5 and "lr" in r] == [0.01]


def test_resume_refuses_a_model_of_another_shape(tmp_path: Path, ov, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert train(ov(out, **{"train.max_steps": 2, "checkpoint.every_steps": 2, "checkpoint.verify": "none"})) == 0
    ckpt = out / "checkpoints" / "step_00000002"
    # A config that lies about the model (verify=none lets the edit through): shapes must catch it.
    saved = ckpt / "config.yaml"
    saved.write_text(saved.read_text().replace("dim: 64", "dim: 32"))
    argv = ov(tmp_path / "new", **{"checkpoint.resume": str(ckpt), "checkpoint.verify": "none"})
    argv = [a.replace("dim: 64", "dim: 32") for a in argv]
    capsys.readouterr()
    assert train(argv) == 2
    err = capsys.readouterr().err
    assert "saved from a different model: shape mismatch" in err and " in the checkpoint vs " in err, err


def test_disk_full_or_read_only_fails_before_training(tmp_path: Path, ov, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    import tunesmith.checkpoint.files as files_mod  # the disk check lives with the file handling

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(files_mod.shutil, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - 4096, 4096))
    out = tmp_path / "run"
    assert train(ov(out, **{"train.max_steps": 2})) == 2
    assert "not enough disk space" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    monkeypatch.undo()

    def read_only(*args: Any, **kwargs: Any):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(files_mod.tempfile, "NamedTemporaryFile", read_only)
    assert train(ov(out, **{"train.max_steps": 2})) == 2
    assert "not writable: Read-only file system" in capsys.readouterr().err


# ----------------------------------------------------------------------------- NaN guard


def _poison(monkeypatch: pytest.MonkeyPatch, bad_steps: set[int]) -> list:
    """Make the loss (and so every gradient) infinite at the given steps."""
    import tunesmith.objective.forward as forward_mod  # what the trainer's TokenObjective calls

    real, built = forward_mod.batch_loss_sum, _with_hook(monkeypatch, lambda *a: None)

    def loss_sum(model, batch, rt, need_grad=True):
        out = real(model, batch, rt, need_grad)
        return out * float("inf") if built and built[0].progress.step + 1 in bad_steps else out

    monkeypatch.setattr(forward_mod, "batch_loss_sum", loss_sum)
    return built


def test_nan_halt(tmp_path: Path, ov, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from tunesmith.checkpoint.export import load_checkpoint_model

    built = _poison(monkeypatch, {4})
    out = tmp_path / "run"
    assert train(ov(out, **{"train.max_steps": 10, "checkpoint.every_steps": 1, "checkpoint.keep_last": 1})) == 3
    err = capsys.readouterr().err
    assert "non-finite loss and grad norm at step 4" in err and "nan_diagnostics.json" in err
    diag = json.loads((out / "nan_diagnostics.json").read_text())
    assert diag["step"] == 4 and diag["params_with_non_finite_grads"]
    # The live weights are exactly those after step 3 (its checkpoint is the newest one).
    *_, after3 = load_checkpoint_model(out / "checkpoints" / "step_00000003")
    assert_same(built[0].model.state_dict(), after3.state_dict())
    assert not (out / "final").exists()


def test_nan_skip(tmp_path: Path, ov, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    _poison(monkeypatch, {3})
    out = tmp_path / "skip"
    assert train(ov(out, **{"train.max_steps": 6, "train.nan_policy": "skip"})) == 0
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert records[3]["loss"] is None and records[3]["skipped_steps"] == 1
    assert records[6]["skipped_steps"] == 1 and summary(out)["skipped_steps"] == 1

    monkeypatch.undo()
    _poison(monkeypatch, set(range(3, 100)))
    out = tmp_path / "halts"
    argv = ov(out, **{"train.max_steps": 20, "train.nan_policy": "skip", "train.max_consecutive_skips": 2})
    capsys.readouterr()
    assert train(argv) == 3
    assert "3 consecutive non-finite steps up to step 5" in capsys.readouterr().err


# ----------------------------------------------------------------------------- export


def test_export_round_trip_through_transformers(tmp_path: Path, ov, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.checkpoint.export import load_checkpoint_model

    out = tmp_path / "run"
    assert train(ov(out, **{"train.max_steps": 3, "checkpoint.every_steps": 3})) == 0
    ckpt = out / "checkpoints" / "step_00000003"
    export = tmp_path / "hf"
    assert run(["-q", "export", str(out), "--format", "hf", "--out", str(export),
                "--max-shard-size", "100KB"]) == 0
    assert (export / "model.safetensors.index.json").is_file() and len(list(export.glob("model-*"))) > 1
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    *_, ours = load_checkpoint_model(ckpt)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=0)
    exported: dict[str, torch.Tensor] = {}
    for shard in sorted(export.glob("model-*.safetensors")):
        exported.update(load_file(shard))
    assert_same(exported, final_params(out))  # the last step was checkpointed: same weights
    tok = AutoTokenizer.from_pretrained(export)
    assert tok("The list")["input_ids"] == AutoTokenizer.from_pretrained(out / "final")("The list")["input_ids"]

    capsys.readouterr()
    assert run(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err
    shutil.rmtree(out / "checkpoints" / "step_00000003" / "hf")
    assert run(["export", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    assert "missing file hf/" in capsys.readouterr().err
