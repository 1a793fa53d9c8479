"""A tiny MoE (Qwen3-MoE shape) through the CLI: training with the load-balancing loss lowers
the loss and logs the aux term, the final model loads in transformers with our logits, a
checkpoint exports to the same model, a LoRA adapter on attention loads in peft with the
logits of `tunesmith merge`, and LoRA on the experts (peft.target_parameters) trains, resumes
exactly and loads in peft; so does QLoRA (NF4 experts), with and without expert adapters."""

from __future__ import annotations

import json
import math

import pytest
import torch

from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from tunesmith.cli.main import run
from tunesmith.models import build_model, init_random, load_pretrained, resolve_model_config, save_pretrained
from tunesmith.models.moe.model import Experts
from tunesmith.peft import expert_lora_modules, load_adapter, merge_lora, nf4_available, quant, quantize_base
from tunesmith.peft.transform import cast_frozen

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


@pytest.fixture(scope="module")
def nf4_base(tmp_path_factory):
    """A random moe-tiny with NF4-friendly widths (every weight a multiple of 64 x 256
    elements), saved as an HF model."""
    family, cfg = resolve_model_config("moe-tiny", {"dim": 128, "n_heads": 2, "n_kv_heads": 2, "head_dim": 64})
    model = init_random(build_model(family, cfg), "cpu", torch.float32, seed=0)
    with torch.no_grad():  # O(1) activations, so the parity below sees real signal
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    out = tmp_path_factory.mktemp("nf4_base")
    save_pretrained(model, family, cfg, out)
    return out


def _qlora_train(base, out, tok, text, params: str, *extra: str) -> int:
    ov = tiny_overrides(tok, out, text, **{
        "model.name": base, "model.overrides": "{}", "peft.method": "qlora", "peft.r": 4,
        "peft.target_modules": "[q_proj, v_proj]", "peft.target_parameters": params, "optim.lr": 1e-2,
        "logging.steps": 1, "schedule.name": "constant", "schedule.warmup_steps": 0, "eval.at_end": "false"})
    return run(["-q", "train", *ov, *extra])


@pytest.mark.skipif(not nf4_available(), reason="torchao with NF4Tensor is not installed")
def test_qlora_trains_resumes_and_loads_in_peft(nf4_base, tmp_path, tiny_tokenizer_dir, demo_text) -> None:
    """peft.method=qlora on an MoE with LoRA on attention and the experts: resumed ==
    uninterrupted, and the adapter loads in transformers + peft on the model whose weights are
    the NF4-roundtripped values with our logits (up to our bf16 compute)."""
    peft = pytest.importorskip("peft")
    experts = "[experts.gate_up_proj, experts.down_proj]"
    straight, split = tmp_path / "straight", tmp_path / "split"
    tok, text = tiny_tokenizer_dir, demo_text[0]
    assert _qlora_train(nf4_base, straight, tok, text, experts, "train.max_steps=4") == 0
    assert _qlora_train(nf4_base, split, tok, text, experts, "train.max_steps=2", "checkpoint.every_steps=2") == 0
    assert _qlora_train(nf4_base, split, tok, text, experts, "train.max_steps=4", "checkpoint.every_steps=2",
                        "checkpoint.resume=auto") == 0
    losses = [r["loss"] for r in _records(straight) if "loss" in r]
    assert [r["loss"] for r in _records(split) if "loss" in r] == losses
    a, b = (load_file(d / "final" / "adapter_model.safetensors") for d in (split, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.count_nonzero(a[k]) for k in a if ".lora_B." in k)  # every B trained (init 0)
    assert any(".experts." in k for k in a)
    conf = json.loads((straight / "final" / "adapter_config.json").read_text())
    assert conf["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]

    family, cfg = resolve_model_config(str(nf4_base))
    adapter = family.adapter(cfg)

    def ours_nf4():
        model = load_pretrained(build_model(family, cfg), str(nf4_base), "cpu", torch.float32)
        quantize_base(model, adapter)
        cast_frozen(model.requires_grad_(False), torch.bfloat16)  # the frozen base as QLoRA stores it
        return model.eval()

    ours = ours_nf4()
    load_adapter(ours, adapter, straight / "final")
    assert all(quant.is_nf4(m.w13) for m in ours.modules() if isinstance(m, Experts)) and expert_lora_modules(ours)
    roundtrip = tmp_path / "nf4_roundtrip"  # our frozen base's values (NF4, bf16) as an HF model
    rt_model = ours_nf4()
    assert merge_lora(rt_model, torch.float32) == 0  # no adapters: NF4 layers dequantised only
    save_pretrained(rt_model.float(), family, cfg, roundtrip)
    hf = lambda path: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # noqa: E731
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = ours(ids).float()
        theirs = peft.PeftModel.from_pretrained(hf(roundtrip), str(straight / "final")).eval()(ids).logits
        dense = peft.PeftModel.from_pretrained(hf(nf4_base), str(straight / "final")).eval()(ids).logits
    per_token = (got - theirs).abs().amax(-1).flatten()  # [32]
    # bf16 compute (our QLoRA base) vs fp32: ~0.03 per token, as transformers' own bf16 vs fp32
    # on this model; a token whose top-k experts are a near-tie may route differently in bf16
    assert (per_token < 0.06).float().mean() >= 0.9, per_token
    # the NF4 rounding itself (the unquantised base) is far larger: the reference is the right one
    assert (got - theirs).abs().mean() < (got - dense).abs().mean() / 5


@pytest.mark.skipif(not nf4_available(), reason="torchao with NF4Tensor is not installed")
def test_qlora_with_attention_adapters_only_keeps_nf4_experts(nf4_base, tmp_path, tiny_tokenizer_dir, demo_text) -> None:
    out = tmp_path / "att"
    assert _qlora_train(nf4_base, out, tiny_tokenizer_dir, demo_text[0], "[]", "train.max_steps=2") == 0
    conf = json.loads((out / "final" / "adapter_config.json").read_text())
    assert "target_parameters" not in conf or not conf["target_parameters"]
    assert not any(".experts." in k for k in load_file(out / "final" / "adapter_model.safetensors"))
    losses = [r["loss"] for r in _records(out) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
