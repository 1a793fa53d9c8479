"""Units behind resumable training: the NaN guard (both paths), resume config rules, signals,
the safe DCP metadata reader and opt-in pickle loading."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tunesmith.checkpoint.metadata import read_metadata
from tunesmith.config import RunConfig, load_config
from tunesmith.errors import TunesmithError
from tunesmith.train.guard import NonFiniteError
from tunesmith.train.preempt import StopRequest, TrainingAborted
from tunesmith.train.resume import config_differences, truncate_metrics

VOCAB = 97


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls gain nothing from threads, and a busy machine makes OpenMP barriers spin.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(tmp_path: Path, *, fused: bool, policy: str = "halt", max_skips: int = 5):
    from tunesmith.models import build_model, init_random, resolve_model_config
    from tunesmith.optim import build_optimizer, build_scheduler
    from tunesmith.runtime import resolve_runtime
    from tunesmith.train.trainer import Trainer

    cfg = RunConfig.model_validate({
        "data": {"path": "x"}, "optim": {"fused": fused, "lr": 1e-2},
        "train": {"precision": "fp32", "nan_policy": policy, "max_consecutive_skips": max_skips},
        "schedule": {"name": "constant"},
    })
    rt = resolve_runtime("cpu", "fp32")
    fam, mcfg = resolve_model_config("tiny", {"vocab_size": VOCAB, "n_layers": 1, "dim": 32,
                                              "n_heads": 2, "intermediate_size": 64})
    model = init_random(build_model(fam, mcfg), device="cpu", dtype=torch.float32, seed=0)
    opt = build_optimizer(model, cfg.optim, rt.device)
    return Trainer(cfg=cfg, rt=rt, model=model, optimizer=opt,
                   scheduler=build_scheduler(opt, cfg.schedule, 100, 100), train_loader=None,
                   val_loader=None, out_dir=tmp_path, total_steps=100, steps_per_epoch=100,
                   flops_per_token=1.0, peak_tflops=None)


def _batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    return {"input_ids": ids, "labels": labels}


def _poison_at(monkeypatch: pytest.MonkeyPatch, bad_steps: set[int], trainer) -> None:
    import tunesmith.objective.forward as forward_mod  # what the trainer's TokenObjective calls

    real = forward_mod.batch_loss_sum

    def loss_sum(model: nn.Module, batch: dict, rt: Any, need_grad: bool = True) -> torch.Tensor:
        out = real(model, batch, rt, need_grad)
        return out * float("inf") if trainer.progress.step + 1 in bad_steps else out

    monkeypatch.setattr(forward_mod, "batch_loss_sum", loss_sum)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("deferred", [False, True])
def test_halt_never_applies_the_bad_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deferred: bool) -> None:
    # deferred=True runs the CUDA design on CPU: fused AdamW honours `found_inf` there too.
    t = _trainer(tmp_path, fused=deferred)
    t.guard.deferred = deferred
    _poison_at(monkeypatch, {3}, t)
    for s in (1, 2):
        t.train_step([_batch(s)])
    t.guard.flush()
    before = _params(t.model)
    steps_before = {id(p): float(st["step"]) for p, st in t.optimizer.state.items()}
    with pytest.raises(NonFiniteError, match="non-finite loss and grad norm at step 3") as exc:
        t.train_step([_batch(3)])
        t.train_step([_batch(4)])  # deferred: the verdict of step 3 arrives one step late
        t.guard.flush()
    assert exc.value.exit_code == 3
    after = _params(t.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # sticky skip covers step 4
    assert {id(p): float(st["step"]) for p, st in t.optimizer.state.items()} == steps_before
    import json

    diag = json.loads((tmp_path / "nan_diagnostics.json").read_text())
    assert diag["step"] == 3 and diag["non_finite"] == ["loss", "grad_norm"]
    assert diag["loss"] == "inf" and "tok_embeddings.weight" in diag["params_with_non_finite_grads"]


@pytest.mark.parametrize("deferred", [False, True])
def test_skip_counts_and_halts_after_too_many(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deferred: bool) -> None:
    t = _trainer(tmp_path, fused=deferred, policy="skip", max_skips=2)
    t.guard.deferred = deferred
    _poison_at(monkeypatch, {2, 4, 5, 6, 7}, t)
    for s in (1, 2, 3):
        t.train_step([_batch(s)])
    t.guard.flush()
    assert t.progress.skipped_steps == 1 and t.progress.consecutive_skips == 0
    assert all(float(st["step"]) == 2 for st in t.optimizer.state.values())  # step 2 not counted
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite steps up to step 6"):
        for s in (4, 5, 6, 7, 8):
            t.train_step([_batch(s)])
        t.guard.flush()
    assert t.progress.skipped_steps == 4


def test_clip_folded_into_the_fused_step_equals_the_clip_pass(tmp_path: Path) -> None:
    # deferred (the CUDA fused path): the clip is fused AdamW's grad_scale divisor instead of a
    # pass over the gradients. A tight max norm clips every step; the updates must match.
    runs = []
    for deferred in (False, True):
        t = _trainer(tmp_path / str(deferred), fused=True)
        t.cfg.train.max_grad_norm = 0.05
        t.guard.deferred = deferred
        norms = [float(t.train_step([_batch(s)])[1]) for s in (1, 2, 3)]
        t.guard.flush()
        assert min(norms) > 0.05  # clipping was active on every step
        runs.append((_params(t.model), norms))
    (ref, ref_norms), (got, norms) = runs
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(got[k], _params(_trainer(tmp_path / "0", fused=True).model)[k])
               for k in got)  # the steps did move the weights


def test_stop_request_first_flags_second_aborts() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingAborted) as exc:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested and stop.name == "SIGTERM"
            os.kill(os.getpid(), signal.SIGTERM)
    assert exc.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_config_rules() -> None:
    cfg = load_config(None, ["data.path=x", "checkpoint.resume=120"])
    assert cfg.checkpoint.resume == "120"
    for bad in ("checkpoint.keep_last=0", "checkpoint.verify=md5", "train.nan_policy=ignore",
                "train.max_consecutive_skips=0", "checkpoint.every_stepz=3"):
        with pytest.raises(TunesmithError, match=bad.split("=")[0].split(".")[1][:10]):
            load_config(None, ["data.path=x", bad])
    base = load_config(None, ["data.path=x"]).model_dump(mode="json")
    harmless = load_config(None, ["data.path=x", "logging.steps=1", "eval.every_steps=5", "optim.lr=1",
                                  "checkpoint.every_steps=2", "output.overwrite=true", "train.max_steps=9",
                                  "data.num_proc=4"]).model_dump(mode="json")
    assert config_differences(base, harmless) == []
    changed = load_config(None, ["data.path=y", "data.block_size=64", "train.seed=1", "optim.name=adafactor",
                                 "model.overrides={dim: 64}", "train.grad_accum_steps=2"]).model_dump(mode="json")
    assert [k for k, _, _ in config_differences(base, changed)] == [
        "data.block_size", "data.path", "model.overrides", "optim.name", "train.grad_accum_steps", "train.seed"]


def test_truncate_metrics_keeps_history_and_drops_torn_line(tmp_path: Path) -> None:
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 2, "eval_loss": 1}\n'
                 '{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    truncate_metrics(f, 2)
    assert f.read_text().splitlines() == ['{"step": 1, "loss": 2.0}', '{"step": 2, "loss": 1.5}',
                                          '{"step": 2, "eval_loss": 1}']


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.getcwd, ())


def test_metadata_reader_refuses_foreign_globals(tmp_path: Path) -> None:
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(TunesmithError, match=r"posix\.getcwd.*--allow-unsafe-pickle"):
        read_metadata(tmp_path)
    with pytest.raises(TunesmithError, match="not DCP checkpoint metadata"):
        read_metadata(tmp_path, allow_pickle=True)  # unpickles (runs getcwd), then rejects the type
    with pytest.raises(TunesmithError, match="no .metadata"):
        read_metadata(tmp_path / "nope")


def _rebuild(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


class _NeedsCode:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.t,))


def test_pickle_weights_need_explicit_opt_in(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tunesmith.models import build_model, load_pretrained, resolve_model_config, save_pretrained

    fam, mcfg = resolve_model_config("tiny", {"vocab_size": VOCAB, "n_layers": 1, "dim": 32, "n_heads": 2,
                                              "intermediate_size": 64})
    src = save_pretrained(build_model(fam, mcfg, device="cpu"), fam, mcfg, tmp_path / "m")
    sd: dict[str, Any] = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    name = next(iter(sd))
    sd[name] = _NeedsCode(sd[name])
    torch.save(sd, src / "pytorch_model.bin")
    with pytest.raises(TunesmithError, match="model.allow_unsafe_pickle=true"):
        load_pretrained(build_model(fam, mcfg), str(src), "cpu", torch.float32)
    model = load_pretrained(build_model(fam, mcfg), str(src), "cpu", torch.float32, allow_pickle=True)
    assert torch.equal(dict(model.named_parameters())["tok_embeddings.weight"].detach(),
                       sd["model.embed_tokens.weight"] if name != "model.embed_tokens.weight"
                       else sd[name].t)
