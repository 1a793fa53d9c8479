"""A tiny MoE (Qwen3-MoE shape) through the CLI: training with the load-balancing loss lowers
the loss and logs the aux term, the final model loads in transformers with our logits, a
checkpoint exports to the same model, a LoRA adapter on attention loads in peft with the
logits of `tunesmith merge`, and LoRA on the experts (peft.target_parameters) trains, resumes
exactly and loads in peft."""

from __future__ import annotations

import json

import pytest
import torch

from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from tunesmith.cli.main import run
from tunesmith.models import build_model, load_pretrained, resolve_model_config
from tunesmith.peft import expert_lora_modules, load_adapter

transformers = pytest.importorskip("transformers")
MOE = ["model.name=moe-tiny", "model.overrides={}"]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer_dir, demo_text):
    out = tmp_path_factory.mktemp("moe") / "run"
    ov = tiny_overrides(tiny_tokenizer_dir, out, demo_text[0], **{
        "train.max_steps": 24, "train.grad_accum_steps": 2, "train.micro_batch_size": 4,
        "train.router_aux_loss_coef": 0.01, "logging.steps": 4, "checkpoint.every_steps": 24})
    assert run(["-q", "train", *ov, *MOE]) == 0
    return out


def test_training_lowers_loss_and_logs_aux(trained) -> None:
    recs = [r for r in _records(trained) if "loss" in r]
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5
    aux = [r["router_aux_loss"] for r in recs]
    # E * sum f_e P_e is 1 under perfect balance and at most E (here 8)
    assert all(0.9 < a < 8 for a in aux)
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["mfu"] is None or summary["mfu"] >= 0


def test_final_model_loads_in_transformers(trained) -> None:
    final = trained / "final"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    family, cfg = resolve_model_config(str(final))
    ours = load_pretrained(build_model(family, cfg), str(final), "cpu", torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_checkpoint_exports_to_the_final_model(trained, tmp_path) -> None:
    """`tunesmith export` streams the DCP checkpoint through the same per-expert split."""
    out = tmp_path / "exported"
    assert run(["-q", "export", str(trained / "checkpoints" / "step_00000024"), "--format", "hf",
                "--out", str(out), "--max-shard-size", "60KB"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        final = transformers.AutoModelForCausalLM.from_pretrained(trained / "final").eval()
        torch.testing.assert_close(exported(ids).logits, final(ids).logits, atol=0, rtol=0)


def test_lora_adapter_loads_in_peft(trained, tmp_path, tiny_tokenizer_dir, demo_text) -> None:
    peft = pytest.importorskip("peft")
    out = tmp_path / "lora"
    ov = tiny_overrides(tiny_tokenizer_dir, out, demo_text[0], **{
        "model.name": trained / "final", "model.overrides": "{}", "train.max_steps": 6,
        "peft.method": "lora", "peft.r": 4, "peft.target_modules": "all-linear", "optim.lr": 1e-2})
    assert run(["-q", "train", *ov]) == 0
    conf = json.loads((out / "final" / "adapter_config.json").read_text())
    assert conf["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]  # never the experts
    merged = tmp_path / "merged"
    assert run(["-q", "merge", str(trained / "final"), str(out / "final"), "--out", str(merged)]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(trained / "final")
    with_adapter = peft.PeftModel.from_pretrained(base, str(out / "final")).eval()
    folded = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = with_adapter(ids).logits
        torch.testing.assert_close(folded(ids).logits, expected, atol=1e-5, rtol=0)
        plain = transformers.AutoModelForCausalLM.from_pretrained(trained / "final").eval()
        assert (plain(ids).logits - expected).abs().max() > 1e-3  # the adapter changed something


def test_expert_lora_trains_resumes_and_loads_in_peft(trained, tmp_path, tiny_tokenizer_dir, demo_text) -> None:
    peft = pytest.importorskip("peft")

    def train(out, *extra: str) -> int:
        ov = tiny_overrides(tiny_tokenizer_dir, out, demo_text[0], **{
            "model.name": trained / "final", "model.overrides": "{}", "peft.method": "lora",
            "peft.r": 4, "peft.target_modules": "[q_proj, v_proj]",
            "peft.target_parameters": "[experts.gate_up_proj, experts.down_proj]",
            "optim.lr": 1e-2, "logging.steps": 1, "train.router_aux_loss_coef": 0.01,
            "schedule.name": "constant", "schedule.warmup_steps": 0})
        return run(["-q", "train", *ov, *extra])

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(straight, "train.max_steps=6") == 0
    assert train(split, "train.max_steps=3", "checkpoint.every_steps=3") == 0
    assert train(split, "train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.resume=auto") == 0
    losses = [r["loss"] for r in _records(straight) if "loss" in r]
    assert [r["loss"] for r in _records(split) if "loss" in r] == losses  # steps 1-3 logged before
    a, b = (load_file(d / "final" / "adapter_model.safetensors") for d in (split, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.count_nonzero(a[k]) for k in a if ".lora_B." in k)  # every B trained (init 0)
    assert any(k.endswith("mlp.experts.base_layer.lora_A.weight") for k in a)  # gate_up_proj's
    conf = json.loads((straight / "final" / "adapter_config.json").read_text())
    assert conf["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]
    family, cfg = resolve_model_config(str(trained / "final"))
    ours = load_pretrained(build_model(family, cfg), str(trained / "final"), "cpu", torch.float32)
    load_adapter(ours, family.adapter(cfg), straight / "final")
    assert expert_lora_modules(ours)
    base = transformers.AutoModelForCausalLM.from_pretrained(trained / "final")
    theirs = peft.PeftModel.from_pretrained(base, str(straight / "final")).eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), theirs(ids).logits, atol=1e-5, rtol=0)
    # peft.from_checkpoint continues the expert adapter (its targets, not the config's): one
    # step at a vanishing learning rate leaves the loaded values (a fresh B would be zero)
    cont = tmp_path / "cont"
    assert train(cont, "train.max_steps=1", f"peft.from_checkpoint={straight / 'final'}", "optim.lr=1e-12",
                 "peft.target_parameters=[]", "peft.target_modules=all-linear") == 0
    c = load_file(cont / "final" / "adapter_model.safetensors")
    assert c.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(c[k], b[k], atol=1e-9, rtol=0, msg=k)
