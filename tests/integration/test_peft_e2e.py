"""A tiny LoRA run through the CLI: loss falls, adapter written, merged model, continue training."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_overrides
from tunesmith.cli.main import run


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_tokenizer_dir, demo_text):
    """A base model worth adapting: 40 full fine-tuning steps of the tiny Llama."""
    out = tmp_path_factory.mktemp("base") / "run"
    recipe = out.parent / "r.yaml"
    recipe.write_text("{}\n")
    ov = tiny_overrides(tiny_tokenizer_dir, out, demo_text[0], **{"train.max_steps": 40})
    assert run(["train", str(recipe), *ov]) == 0
    return out / "final"


def test_lora_cli_run_writes_adapter_merges_and_continues(tmp_path, pretrained, tiny_tokenizer_dir, demo_text):
    train, valid = demo_text
    recipe = tmp_path / "r.yaml"
    recipe.write_text("peft:\n  method: lora\n  r: 8\n  alpha: 16\n  target_modules: [q_proj, v_proj, w2]\n"
                      "  save_merged: true\neval:\n  at_start: true\n")
    out = tmp_path / "lora"
    ov = tiny_overrides(tiny_tokenizer_dir, out, train, **{
        "model.name": pretrained, "model.overrides": "{}", "data.validation_path": valid,
        "train.max_steps": 30, "optim.lr": 1e-2,
    })
    assert run(["train", str(recipe), *ov]) == 0
    summary = json.loads((out / "summary.json").read_text())
    losses = [r["loss"] for r in _records(out) if "loss" in r]
    assert losses[-1] < losses[0] and summary["eval_loss"] < summary["eval_loss_start"]
    final = out / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (final / name).is_file(), name
    assert not (final / "model.safetensors").exists()  # the adapter, not a copy of the base
    conf = json.loads((final / "adapter_config.json").read_text())
    assert conf["target_modules"] == ["down_proj", "q_proj", "v_proj"] and conf["r"] == 8

    # The merged model is a plain HF model with the adapted model's eval loss.
    from tunesmith.eval.run import run_eval

    merged = run_eval(str(out / "final-merged"), str(valid), block_size=64, device="cpu", precision="fp32")
    assert abs(merged["eval_loss"] - summary["eval_loss"]) < 1e-4

    # Continue training the saved adapter: it starts where the first run ended.
    out2 = tmp_path / "lora2"
    ov2 = [o for o in ov if not o.startswith("output.dir=")] + [f"output.dir={out2}",
                                                              f"peft.from_checkpoint={final}"]
    assert run(["train", str(recipe), *ov2, "train.max_steps=5", "peft.save_merged=false"]) == 0
    summary2 = json.loads((out2 / "summary.json").read_text())
    assert abs(summary2["eval_loss_start"] - summary["eval_loss"]) < 1e-4


def test_lora_run_trainable_state_is_adapters_only(tmp_path, pretrained, tiny_tokenizer_dir, demo_text):
    """What the trainer's checkpoint hook gets for a LoRA run: adapters only, no base tensors."""
    from tunesmith.config import load_config
    from tunesmith.peft import checkpoint_model_state, is_peft_model
    from tunesmith.train.setup import build_trainer

    ov = tiny_overrides(tiny_tokenizer_dir, tmp_path / "o", demo_text[0], **{
        "model.name": pretrained, "model.overrides": "{}", "peft.method": "dora", "train.max_steps": 5,
    })
    trainer, bundle = build_trainer(load_config(None, ov))
    assert is_peft_model(trainer.model)
    keys = set(checkpoint_model_state(trainer.model).state_dict())
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert keys == trainable and all(".lora_" in k for k in keys)
    opt_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(opt_params) == len(trainable) and all(p.requires_grad for p in opt_params)
    assert all(p.dtype == torch.float32 for p in opt_params)


def test_llama_adapter_cli_run_saves_a_peft_adapter_and_continues(tmp_path, pretrained, tiny_tokenizer_dir,
                                                                   demo_text, capsys):
    """peft.method=llama_adapter through `tunesmith train`: the prompts train (gates leave zero,
    the eval loss moves), OUTPUT/final is a PEFT ADAPTION_PROMPT adapter that peft loads with
    our logits, and it continues training where it ended. (On this barely trained 2-block base
    30 steps of two prompts do not reliably lower the eval loss; the gradients themselves are
    checked against peft in tests/parity/test_llama_adapter_parity.py.)"""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from tunesmith.models.registry import adaption_point
    from tunesmith.peft.adaption_io import load_adaption
    from tests.peft_utils import load_ours

    train, valid = demo_text
    recipe = tmp_path / "r.yaml"
    recipe.write_text("peft:\n  method: llama_adapter\n  adapter_len: 6\n  adapter_layers: 2\n"
                      "eval:\n  at_start: true\n")
    out = tmp_path / "ad"
    ov = tiny_overrides(tiny_tokenizer_dir, out, train, **{
        "model.name": pretrained, "model.overrides": "{}", "data.validation_path": valid,
        "train.max_steps": 10, "optim.lr": 5e-2, "schedule.warmup_steps": 0,
    })
    assert run(["train", str(recipe), *ov]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss"] != summary["eval_loss_start"]  # small here: wv of this base is small
    final = out / "final"
    conf = json.loads((final / "adapter_config.json").read_text())
    assert conf["peft_type"] == "ADAPTION_PROMPT" and (conf["adapter_len"], conf["adapter_layers"]) == (6, 2)
    assert not (final / "model.safetensors").exists()
    from safetensors.torch import load_file

    gates = [t for k, t in load_file(final / "adapter_model.safetensors").items() if k.endswith("adaption_gate")]
    assert len(gates) == 2 and all(g.abs().item() > 1e-3 for g in gates)

    ours, family, cfg = load_ours(pretrained)
    load_adaption(ours, adaption_point(cfg.model_type), family.adapter(cfg), final)
    hf = transformers.AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, final).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours.eval()(x), atol=1e-5, rtol=0)

    out2 = tmp_path / "ad2"  # continue: starts where the first run ended
    ov2 = [o for o in ov if not o.startswith("output.dir=")] + [f"output.dir={out2}",
                                                              f"peft.from_checkpoint={final}"]
    assert run(["train", str(recipe), *ov2, "train.max_steps=2"]) == 0
    assert abs(json.loads((out2 / "summary.json").read_text())["eval_loss_start"] - summary["eval_loss"]) < 1e-4

    capsys.readouterr()  # bad combinations: one line, exit 2
    assert run(["train", str(recipe), *ov, "peft.adapter_layers=3", f"output.dir={tmp_path / 'x'}"]) == 2
    assert "peft.adapter_layers=3 exceeds the model's 2 transformer blocks" in capsys.readouterr().err
    assert run(["merge", str(pretrained), str(final), "--out", str(tmp_path / "m")]) == 2
    assert "is a Llama-Adapter (peft_type ADAPTION_PROMPT)" in capsys.readouterr().err
