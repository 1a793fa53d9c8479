"""Checkpoint core: DCP round-trips, exact resume, atomic keep-last-K, verification, safe loading."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tunesmith.checkpoint.manager as manager_mod
from tunesmith.checkpoint import (
    CheckpointManager,
    ModelState,
    ObjectState,
    OptimizerState,
    RNGState,
    check_disk,
    estimate_bytes,
    load_weights_file,
)
from tunesmith.errors import TunesmithError

VOCAB, DIM = 16, 8


class Toy(nn.Module):
    """Embedding tied to the output head, a frozen param, dropout (so RNG matters), buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.frozen_scale = nn.Parameter(torch.rand(DIM) + 0.5, requires_grad=False)
        self.drop = nn.Dropout(0.2)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        self.output.weight = self.tok_embeddings.weight
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("scratch", torch.zeros(DIM), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.drop(torch.tanh(self.proj(self.tok_embeddings(x)))) * self.frozen_scale
        return self.output(h)


class FakeLoader:
    """Batches depend only on `pos`, so resuming needs the loader state."""

    def __init__(self) -> None:
        self.pos = 0
        self.epoch = 0

    def next_batch(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + self.pos)
        self.pos += 1
        if self.pos % 5 == 0:
            self.epoch += 1
        return torch.randint(0, VOCAB, (4, 6), generator=g)

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "epoch": self.epoch, "order": (3, 1, 2), "note": None}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.pos, self.epoch = sd["pos"], sd["epoch"]


class Run:
    """Everything a trainer owns, built fresh from a seed."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        self.model = Toy()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / 3))
        self.loader = FakeLoader()
        self.progress: dict[str, Any] = {"step": 0, "epoch": 0, "tokens_seen": 0, "skipped_steps": 0}

    def set_progress(self, sd: dict[str, Any]) -> None:
        self.progress = dict(sd)

    def app_state(self, trainable_only: bool = False) -> dict[str, Any]:
        return {
            "model": ModelState(self.model, trainable_only=trainable_only),
            "optim": OptimizerState(self.model, self.opt),
            "sched": ObjectState(self.sched.state_dict, self.sched.load_state_dict),
            "loader": ObjectState(self.loader.state_dict, self.loader.load_state_dict, per_rank=True),
            "progress": ObjectState(lambda: self.progress, self.set_progress),
            "rng": RNGState(),
        }

    def train(self, steps: int) -> None:
        for _ in range(steps):
            x = self.loader.next_batch()
            # python and numpy RNG feed the loss too, so all three streams must be restored
            noise = random.random() + float(np.random.rand())
            loss = nn.functional.cross_entropy(self.model(x).flatten(0, 1), x.flatten()) * (1 + 0.01 * noise)
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.progress["step"] += 1
            self.progress["tokens_seen"] += x.numel()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def _saved_run(tmp_path: Path, steps: int = 3) -> tuple[Run, CheckpointManager, Path]:
    run = Run(seed=0)
    run.train(steps)
    mgr = CheckpointManager(tmp_path, keep_last=None)
    return run, mgr, mgr.save(steps, run.app_state(), config={"optim": {"lr": 1e-2}})


# ----------------------------------------------------------------------------- round trips


def test_round_trip_restores_everything(tmp_path: Path) -> None:
    run, mgr, path = _saved_run(tmp_path)
    draws_after_save = (random.random(), float(np.random.rand()), torch.rand(3))

    fresh = Run(seed=123)
    manifest = mgr.load(path, fresh.app_state())
    draws_after_load = (random.random(), float(np.random.rand()), torch.rand(3))

    assert manifest["step"] == 3
    _assert_same_params(run.model, fresh.model)
    assert fresh.model.output.weight is fresh.model.tok_embeddings.weight
    assert fresh.model.output.weight.data_ptr() == fresh.model.tok_embeddings.weight.data_ptr()
    for p_old, p_new in zip(run.opt.param_groups[0]["params"], fresh.opt.param_groups[0]["params"]):
        s_old, s_new = run.opt.state[p_old], fresh.opt.state[p_new]
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s_old[key], s_new[key]), key
    assert fresh.opt.param_groups[0]["lr"] == run.opt.param_groups[0]["lr"]
    assert fresh.sched.state_dict() == run.sched.state_dict()
    assert (fresh.loader.pos, fresh.loader.epoch) == (run.loader.pos, run.loader.epoch)
    assert fresh.progress == run.progress
    assert draws_after_load[:2] == draws_after_save[:2]
    assert torch.equal(draws_after_load[2], draws_after_save[2])


@pytest.mark.parametrize("first", [0, 3])
def test_resume_is_bitwise_identical(tmp_path: Path, first: int) -> None:
    # first=0 also covers a checkpoint taken before the optimizer ever stepped
    straight = Run(seed=0)
    straight.train(first + 3)

    half = Run(seed=0)
    half.train(first)
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(first, half.app_state())
    half.train(7)  # the saved run keeps going; the checkpoint must not care

    resumed = Run(seed=99)
    mgr.load(path, resumed.app_state())
    resumed.train(3)
    _assert_same_params(straight.model, resumed.model)
    assert resumed.progress == straight.progress


def test_optimizer_state_dict_does_not_touch_a_fresh_optimizer() -> None:
    run = Run(seed=0)
    OptimizerState(run.model, run.opt).state_dict()
    assert not run.opt.state


def test_object_state_round_trips_non_tensor_values(tmp_path: Path) -> None:
    payload = {"a": (1, 2.5, None), "b": {"nested": [float("inf"), "x", b"\x00\x01"]}, 3: {1, 2}}
    holder: dict[str, Any] = {}
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(1, {"obj": ObjectState(lambda: payload, lambda v: None)})
    # a fresh object with none of the saved keys still gets everything back
    mgr.load(path, {"obj": ObjectState(lambda: {}, lambda v: holder.update(v=v))})
    assert holder["v"] == payload


def test_trainable_only_saves_trainable_params_and_persistent_buffers(tmp_path: Path) -> None:
    run = Run(seed=0)
    run.train(2)
    keys = set(ModelState(run.model, trainable_only=True).state_dict())
    assert keys == {"tok_embeddings.weight", "output.weight", "proj.weight", "proj.bias", "calls"}
    assert "frozen_scale" in ModelState(run.model).state_dict()

    mgr = CheckpointManager(tmp_path)
    path = mgr.save(2, {"model": ModelState(run.model, trainable_only=True)})
    fresh = Run(seed=5)
    frozen_before = fresh.model.frozen_scale.detach().clone()
    mgr.load(path, {"model": ModelState(fresh.model, trainable_only=True)})
    assert torch.equal(fresh.model.proj.weight, run.model.proj.weight)
    assert torch.equal(fresh.model.calls, run.model.calls)
    assert torch.equal(fresh.model.frozen_scale, frozen_before)
    # a full-model load from a trainable-only checkpoint must fail loudly, naming the key
    with pytest.raises(TunesmithError, match="frozen_scale"):
        mgr.load(path, {"model": ModelState(Run(seed=6).model)})


# ----------------------------------------------------------------------------- manifest / keep-last


def test_manifest_and_config(tmp_path: Path) -> None:
    _, mgr, path = _saved_run(tmp_path)
    assert path == tmp_path / "checkpoints" / "step_00000003"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["step"] == 3
    assert manifest["torch_version"] == torch.__version__ and manifest["hash"] == "sha256"
    assert manifest["created_at"]
    names = {f["path"] for f in manifest["files"]}
    assert {".metadata", "config.yaml"} <= names and any(n.endswith(".distcp") for n in names)
    assert "manifest.json" not in names
    for f in manifest["files"]:
        data = (path / f["path"]).read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert mgr.read_config(path) == {"optim": {"lr": 1e-2}}
    assert mgr.verify(path) is None


def test_keep_last_and_failed_save_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Run(seed=0)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 5):
        mgr.save(step, run.app_state())
    assert [p.name for p in mgr.list_complete()] == ["step_00000003", "step_00000004"]

    real_save = manager_mod.dcp.save

    def save_then_crash(state: dict[str, Any], *, checkpoint_id: Path) -> None:
        real_save(state, checkpoint_id=checkpoint_id)
        raise RuntimeError("simulated crash mid-save")

    monkeypatch.setattr(manager_mod.dcp, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        mgr.save(5, run.app_state())
    monkeypatch.undo()

    assert [p.name for p in mgr.list_complete()] == ["step_00000003", "step_00000004"]
    assert not (tmp_path / "checkpoints" / "step_00000005").exists()
    leftovers = list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert len(leftovers) == 1 and any(leftovers[0].iterdir())
    assert mgr.latest_complete() == tmp_path / "checkpoints" / "step_00000004"

    restarted = CheckpointManager(tmp_path, keep_last=2)
    assert restarted.cleanup_partial() == leftovers
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_disk_full_during_save_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(state: dict[str, Any], *, checkpoint_id: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager_mod.dcp, "save", no_space)
    with pytest.raises(TunesmithError, match="could not write checkpoint .*No space left"):
        CheckpointManager(tmp_path).save(1, Run(seed=0).app_state())
    assert CheckpointManager(tmp_path).list_complete() == []


def test_resave_same_step_replaces_and_keep_none(tmp_path: Path) -> None:
    run = Run(seed=0)
    mgr = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2, 3):
        mgr.save(step, run.app_state())
    run.train(1)
    mgr.save(3, run.app_state(), meta={"loss": 1.5})
    assert len(mgr.list_complete()) == 3
    assert mgr.read_manifest(mgr.step_dir(3))["meta"] == {"loss": 1.5}
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_bad_manager_arguments(tmp_path: Path) -> None:
    with pytest.raises(TunesmithError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(TunesmithError, match="verify"):
        CheckpointManager(tmp_path, verify="md5")  # type: ignore[arg-type]
    with pytest.raises(TunesmithError, match="step"):
        CheckpointManager(tmp_path).save(-1, {})


# ----------------------------------------------------------------------------- verification


def _shard(path: Path) -> Path:
    return next(path.glob("*.distcp"))


def test_corruption_is_detected_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = Run(seed=0)
    mgr = CheckpointManager(tmp_path, keep_last=None)
    first, second, third = (mgr.save(s, run.app_state()) for s in (1, 2, 3))

    data = bytearray(_shard(third).read_bytes())
    data[len(data) // 2] ^= 0xFF
    _shard(third).write_bytes(bytes(data))
    assert mgr.verify(third) == f"checksum mismatch for {_shard(third).name}"
    assert CheckpointManager(tmp_path, verify="size").verify(third) is None  # size-only can't see it

    shard = _shard(second)
    shard.write_bytes(shard.read_bytes()[:100])
    assert "size mismatch" in (mgr.verify(second) or "")

    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        assert mgr.latest_complete() == first
    assert "step_00000003" in caplog.text and "checksum mismatch" in caplog.text
    assert "step_00000002" in caplog.text

    with pytest.raises(TunesmithError, match="could not load checkpoint"):
        mgr.load(second, Run(seed=1).app_state())

    (first / "config.yaml").unlink(missing_ok=True)
    (first / ".metadata").unlink()
    assert mgr.verify(first) == "missing file .metadata"
    (first / "manifest.json").unlink()
    assert mgr.verify(first) == "missing manifest.json"
    assert mgr.latest_complete() is None


def test_resolve(tmp_path: Path) -> None:
    run = Run(seed=0)
    mgr = CheckpointManager(tmp_path, keep_last=None)
    assert mgr.resolve("auto") is None
    p1, p2 = mgr.save(100, run.app_state()), mgr.save(200, run.app_state())
    assert mgr.resolve("auto") == p2
    assert mgr.resolve("100") == p1
    assert mgr.resolve(str(p1)) == p1
    with pytest.raises(TunesmithError, match="step 300.*100, 200"):
        mgr.resolve("300")
    missing = tmp_path / "nope"
    with pytest.raises(TunesmithError, match=f"{missing}.*does not exist"):
        mgr.resolve(str(missing))
    not_ckpt = tmp_path / "empty"
    not_ckpt.mkdir()
    with pytest.raises(TunesmithError, match=f"{not_ckpt}.*missing manifest.json"):
        mgr.resolve(str(not_ckpt))
    _shard(p2).write_bytes(b"")
    with pytest.raises(TunesmithError, match="size mismatch"):
        mgr.resolve("200")
    assert mgr.resolve("auto") == p1


# ----------------------------------------------------------------------------- disk space


def test_estimate_and_check_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Run(seed=0)
    model_bytes = sum(t.numel() * t.element_size() for t in run.model.state_dict().values())
    est = estimate_bytes(run.app_state())
    assert est >= model_bytes
    assert not run.opt.state  # estimating must not initialise the optimizer

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(manager_mod.shutil, "disk_usage", lambda p: usage(10 << 30, 9 << 30, 1 << 30))
    check_disk(tmp_path, 100 << 20)
    with pytest.raises(TunesmithError, match=r"0\.75 GiB.*1\.50 GiB.*1\.00 GiB free"):
        check_disk(tmp_path, 768 << 20)

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(TunesmithError, match="not writable"):
        check_disk(blocker / "run", 1)


# ----------------------------------------------------------------------------- safe_load

RAN_UNPICKLE_CODE: list[int] = []


def _build_tensor(n: int) -> torch.Tensor:
    RAN_UNPICKLE_CODE.append(n)
    return torch.full((n,), 7.0)


class NeedsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_build_tensor, (3,))


def test_safe_load(tmp_path: Path) -> None:
    weights = {"w": torch.randn(2, 3), "b": torch.zeros(3)}
    save_file(weights, tmp_path / "m.safetensors")
    torch.save(weights, tmp_path / "m.bin")
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "wrapped.pt")
    for name in ("m.safetensors", "m.bin", "wrapped.pt"):
        got = load_weights_file(tmp_path / name)
        assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)

    torch.save({"w": NeedsCode()}, tmp_path / "evil.pth")
    with pytest.raises(TunesmithError, match="--allow-unsafe-pickle"):
        load_weights_file(tmp_path / "evil.pth")
    assert not RAN_UNPICKLE_CODE
    assert torch.equal(load_weights_file(tmp_path / "evil.pth", allow_pickle=True)["w"], torch.full((3,), 7.0))
    assert RAN_UNPICKLE_CODE == [3]

    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 8)
    (tmp_path / "m.onnx").write_bytes(b"")
    for name, msg in (("junk.pt", "cannot read"), ("m.onnx", "unsupported"), ("missing.bin", "not found")):
        with pytest.raises(TunesmithError, match=msg):
            load_weights_file(tmp_path / name)
    shutil.copy(tmp_path / "m.bin", tmp_path / "broken.safetensors")
    with pytest.raises(TunesmithError, match="safetensors"):
        load_weights_file(tmp_path / "broken.safetensors")
