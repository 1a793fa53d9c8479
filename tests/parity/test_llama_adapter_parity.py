"""Llama-Adapter (peft.method=llama_adapter) vs HF peft's adaption_prompt: logits and gradients
on tiny random Llamas (multi-head and grouped-query), save/load in both directions, zero-init."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tests.peft_utils import batch, ids, load_ours, make_trainer, save_base, train_steps  # noqa: E402
from tunesmith.errors import TunesmithError  # noqa: E402
from tunesmith.models.registry import adaption_point  # noqa: E402
from tunesmith.objective.forward import batch_loss_sum  # noqa: E402
from tunesmith.peft import is_peft_model  # noqa: E402
from tunesmith.peft.adaption import adaption_modules, apply_adaption_prompt, init_adaption  # noqa: E402
from tunesmith.peft.adaption_io import load_adaption, save_adaption  # noqa: E402
from tunesmith.runtime import resolve_runtime  # noqa: E402

ATOL = 1e-5
SHAPES = {"gqa": {}, "mha": {"n_kv_heads": 4}}  # tests.peft_utils.TINY: 4 heads, 2 kv heads


@pytest.fixture(scope="module", params=sorted(SHAPES))
def base_dir(request, tmp_path_factory):
    return save_base(tmp_path_factory.mktemp(f"ap_{request.param}"), **SHAPES[request.param])


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _peft_made(base_dir, out, adapter_len=5, adapter_layers=2):
    """An adaption-prompt adapter made by peft, gates moved off zero so the prompts count."""
    torch.manual_seed(3)
    conf = peft.AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                     task_type="CAUSAL_LM")
    model = peft.get_peft_model(_hf(base_dir), conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.copy_(torch.randn(1))
    model.save_pretrained(out)
    return model.eval()


def test_peft_made_adapter_loads_into_ours_with_identical_logits_and_grads(base_dir, tmp_path):
    theirs = _peft_made(base_dir, tmp_path / "ad")
    ours, family, cfg = load_ours(base_dir)
    files = load_adaption(ours, adaption_point(cfg.model_type), family.adapter(cfg), tmp_path / "ad")
    assert (files.adapter_len, files.adapter_layers) == (5, 2)
    assert sorted(adaption_modules(ours)) == ["layers.0.attention", "layers.1.attention"]
    assert is_peft_model(ours)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.attention.{k}" for i in (0, 1)
                         for k in ("adaption_prompt", "adaption_gate")}
    b = batch(seed=5, b=3, t=19)
    with torch.no_grad():
        torch.testing.assert_close(ours(b["input_ids"]), theirs(b["input_ids"]).logits,
                                   atol=ATOL, rtol=0)
    # gradients of the same summed loss, for every prompt and gate
    loss_ours = batch_loss_sum(ours, b, resolve_runtime("cpu", "fp32"))
    loss_ours.backward()
    logits = theirs(b["input_ids"]).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(),
                                      ignore_index=-100, reduction="sum").backward()
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(want) == len(got) == 4
    for name, g in got.items():
        peft_name = "base_model.model.model." + name.replace("attention", "self_attn")
        torch.testing.assert_close(g, want[peft_name], atol=1e-4, rtol=1e-4, msg=name)


def test_our_adapter_loads_in_peft_with_identical_logits(base_dir, tmp_path):
    ours, family, cfg = load_ours(base_dir)
    point = adaption_point(cfg.model_type)
    apply_adaption_prompt(ours, point, adapter_len=4, adapter_layers=1)
    init_adaption(ours, seed=0)
    x = ids(2, 16, seed=9)
    base_logits = load_ours(base_dir)[0](x).detach()
    with torch.no_grad():  # zero-initialised gate: exactly the base model
        torch.testing.assert_close(ours(x), base_logits, atol=0, rtol=0)
    train_steps(make_trainer(ours, lr=5e-2), 4)
    gate = ours.layers[1].attention.adaption_gate
    assert gate.abs().item() > 0 and not ours.layers[0].attention.wq.weight.requires_grad
    save_adaption(ours, point, family.adapter(cfg), tmp_path / "ad", base_model=str(base_dir))
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "ADAPTION_PROMPT" and conf["target_modules"] == "self_attn"
    assert (conf["adapter_len"], conf["adapter_layers"]) == (4, 1)
    theirs = peft.PeftModel.from_pretrained(_hf(base_dir), tmp_path / "ad").eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), atol=ATOL, rtol=0)
        assert (ours(x) - base_logits).abs().max() > 1e-3  # the prompt really changed something


def test_bad_adapters_are_refused_in_one_line(base_dir, tmp_path):
    _peft_made(base_dir, tmp_path / "ad", adapter_layers=1)
    ours, family, cfg = load_ours(base_dir)
    point = adaption_point(cfg.model_type)
    conf_path = tmp_path / "ad" / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    conf_path.write_text(json.dumps({**conf, "adapter_len": 7}))
    with pytest.raises(TunesmithError, match=r"adaption_prompt is \[1, 5, 64\], the model needs \[1, 7, 64\]"):
        load_adaption(ours, point, family.adapter(cfg), tmp_path / "ad")
    conf_path.write_text(json.dumps({**conf, "adapter_layers": 2}))
    with pytest.raises(TunesmithError, match="adapts 1 attention modules, adapter_layers=2"):
        load_adaption(ours, point, family.adapter(cfg), tmp_path / "ad")
    with pytest.raises(TunesmithError, match="exceeds the model's 2 transformer blocks"):
        apply_adaption_prompt(ours, point, adapter_len=4, adapter_layers=3)
    with pytest.raises(TunesmithError, match=r"not available for model_type 'qwen2' \(peft's adaption_prompt: llama, mistral\)"):
        adaption_point("qwen2")


def test_peft_adapter_on_stories260k_matches(tmp_path):
    """A real (if small) checkpoint: stories260K, grouped-query (8 heads, 4 kv), 5 blocks."""
    from tests.conftest import shared_path

    base = shared_path("models", "stories260K", "hf")
    theirs = _peft_made(base, tmp_path / "ad", adapter_len=3, adapter_layers=3)
    ours, family, cfg = load_ours(base)
    load_adaption(ours, adaption_point(cfg.model_type), family.adapter(cfg), tmp_path / "ad")
    x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=ATOL, rtol=0)
