"""Preference tuning (task=dpo) through the real CLI on the pretrained stories260K Llama (CPU,
fp32): LoRA DPO starts at log 2 (policy = reference) and learns its pairs; a resumed run equals
an uninterrupted one (the reference is the starting model, never the resumed weights), for LoRA
and for a full fine-tune with a frozen reference copy; SimPO and ORPO train without a reference; what
cannot work is refused in one line with exit code 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, shared_path
from tunesmith.cli.main import run

RECIPE = REPO / "recipes" / "llama_dpo_lora.yaml"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """Bitwise comparisons between runs hold for a fixed thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(out: Path, *extra: str) -> int:
    shared_path("models", "stories260K", "hf")
    return run(["-q", "train", str(RECIPE), f"output.dir={out}", "train.precision=fp32",
                "logging.steps=1", "eval.every_steps=null", "eval.at_end=false",
                "logging.progress=false", *extra])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_records(out: Path) -> dict[int, dict]:
    keys = ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "logps_chosen")
    return {r["step"]: {k: r[k] for k in keys} for r in _records(out) if "loss" in r}


def test_lora_dpo_starts_at_log2_and_learns_its_pairs(tmp_path: Path) -> None:
    out = tmp_path / "lora"
    assert _train(out, "train.max_steps=12", "eval.at_end=true") == 0
    recs = _train_records(out)
    # B = 0 at init: the adapted policy is its reference, every pair's loss is log 2.
    assert recs[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert recs[1]["rewards_chosen"] == pytest.approx(0.0, abs=1e-6)
    assert recs[12]["loss"] < 0.3 and recs[12]["reward_accuracy"] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train"]["pairs"] == 12 and summary["eval_pairs"] == 4
    assert "eval_reward_accuracy" in summary and "perplexity" not in summary
    assert (out / "final" / "adapter_model.safetensors").is_file()  # PEFT format, as any LoRA run


@pytest.mark.parametrize("method", ["lora", "none"])
def test_resume_equals_an_uninterrupted_run(tmp_path: Path, method: str) -> None:
    """With a full fine-tune the reference is a frozen copy of model.name: were it taken from
    the resumed weights, the resumed steps' losses and rewards would differ."""
    extra = [f"peft.method={method}", "optim.lr=2e-3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, "train.max_steps=6", *extra) == 0
    assert _train(split, "train.max_steps=3", "checkpoint.every_steps=3", *extra) == 0
    assert _train(split, "train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.resume=auto", *extra) == 0
    assert _train_records(split) == _train_records(straight)
    assert _train_records(straight)[6]["loss"] < math.log(2)  # it did train
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(split / "final" / name), load_file(straight / "final" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss,beta", [("simpo", "2.0"), ("orpo", "0.1")])
def test_reference_free_losses_train_a_model_from_scratch(tmp_path: Path, loss: str, beta: str) -> None:
    out = tmp_path / loss
    assert _train(out, "train.max_steps=6", f"dpo.loss={loss}", f"dpo.beta={beta}", "peft.method=none",
                  "model.from_scratch=true", "optim.lr=3e-3") == 0
    recs = _train_records(out)
    assert recs[6]["loss"] < recs[1]["loss"]


@pytest.mark.parametrize("method", ["lora", "none"])
def test_precomputed_reference_matches_the_per_step_reference(tmp_path: Path, method: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """dpo.precompute_reference: the pairs scored once before training give the same run as the
    reference forward at every step (training and eval records, final weights), LoRA and full
    fine-tune; a resumed precomputed run equals its uninterrupted twin. The only difference
    allowed is fp32 rounding from other padded lengths in the precompute pass."""
    extra = [f"peft.method={method}", "optim.lr=2e-3", "eval.at_end=true"]
    per_step, pre, split = tmp_path / "per_step", tmp_path / "pre", tmp_path / "split"
    assert _train(per_step, "train.max_steps=6", *extra) == 0
    with caplog.at_level("INFO", logger="tunesmith"):
        assert _train(pre, "train.max_steps=6", "dpo.precompute_reference=true", *extra) == 0
    note = [r.getMessage() for r in caplog.records if "precomputed" in r.getMessage()]
    assert note and "for 32 rows" in note[0]  # 12 training + 4 validation pairs, 2 rows each
    assert ("reference copy is released" in note[0]) == (method == "none")
    want, got = _records(per_step), _records(pre)
    assert len(got) == len(want) == 7  # 6 steps + the final eval
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "reward_margin", "rewards_chosen", "eval_loss", "eval_reward_margin"):
            if key in w:
                assert g[key] == pytest.approx(w[key], abs=1e-5), (w["step"], key)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(pre / "final" / name), load_file(per_step / "final" / name)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    args = ("dpo.precompute_reference=true", "checkpoint.every_steps=3", *extra)
    assert _train(split, "train.max_steps=3", *args) == 0
    assert _train(split, "train.max_steps=6", "checkpoint.resume=auto", *args) == 0
    assert _train_records(split) == _train_records(pre)


def test_precompute_needs_a_reference_loss(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _train(tmp_path / "bad", "dpo.loss=simpo", "dpo.precompute_reference=true") == 2
    err = capsys.readouterr().err.strip()
    assert "dpo.precompute_reference: dpo.loss=simpo has no reference policy" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra,message", [
    (["peft.method=none", "model.from_scratch=true"], "must hold pretrained weights"),
    (["sft.packing=true"], "sft.packing is not supported"),
    (["parallel.cp=2"], "context parallelism (parallel.cp > 1) is not supported"),
    (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "label_smoothing applies to dpo.loss=sigmoid"),
    (["sft.train_on_inputs=true"], "train_on_inputs"),
])
def test_refusals_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, extra, message) -> None:
    out = tmp_path / "bad"
    assert _train(out, "train.max_steps=2", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()


def test_gradient_accumulation_equals_the_larger_micro_batch(tmp_path: Path) -> None:
    """The loss is normalised by the step's pair count: 2 micro-batches of 2 pairs give the
    step of one micro-batch of 4."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert _train(one, "train.max_steps=4", "train.micro_batch_size=4") == 0
    assert _train(two, "train.max_steps=4", "train.micro_batch_size=2", "train.grad_accum_steps=2") == 0
    a, b = _train_records(one), _train_records(two)
    for step in a:
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, key)
    wa, wb = load_file(one / "final" / "adapter_model.safetensors"), load_file(two / "final" / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=0)  # Adam on float-order noise (as the 2-rank tests)
