"""Our adapters vs HF peft: save/load both ways, merge, DoRA numerics and gradients."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tests.peft_utils import ids, load_ours, make_trainer, save_base, train_steps  # noqa: E402
from tunesmith.cli.main import run  # noqa: E402
from tunesmith.errors import TunesmithError  # noqa: E402
from tunesmith.peft import LoRASpec, apply_lora, load_adapter, lora_modules, merge_lora, save_adapter  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("peft_base"))


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _trained_ours(base_dir, spec: LoRASpec, targets, steps: int = 4):
    """Our model on the base with fresh adapters, trained a few steps so B != 0 (and m moved)."""
    model, family, cfg = load_ours(base_dir)
    torch.manual_seed(0)
    apply_lora(model, family.adapter(cfg), spec, targets)
    train_steps(make_trainer(model, lr=2e-2), steps)
    assert all(torch.count_nonzero(m.lora_B) for m in lora_modules(model).values())
    return model.eval(), family, cfg


@pytest.mark.parametrize(("spec", "targets"), [
    (LoRASpec(r=4, alpha=8, dropout=0.1), ["q_proj", "v_proj", "down_proj"]),
    (LoRASpec(r=8, alpha=4, rslora=True), "all-linear"),
    (LoRASpec(r=4, alpha=8, dora=True), "all-linear"),
    (LoRASpec(r=2, alpha=2), r"layers\.1\.attention\.w[qo]"),  # a subset of blocks: regex config
], ids=["lora", "rslora-all-linear", "dora", "regex-subset"])
def test_our_adapter_loads_in_peft_with_identical_logits(base_dir, tmp_path, spec, targets) -> None:
    ours, family, cfg = _trained_ours(base_dir, spec, targets)
    save_adapter(ours, family.adapter(cfg), tmp_path / "ad", base_model=str(base_dir))
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["use_dora"] == spec.dora and conf["r"] == spec.r
    theirs = peft.PeftModel.from_pretrained(_hf(base_dir), tmp_path / "ad").eval()
    n_lora = sum(1 for n, _ in theirs.named_modules() if n.endswith(".lora_A"))
    assert n_lora == len(lora_modules(ours))  # peft wrapped exactly our layers, no more
    x = ids(3, 20, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), atol=ATOL, rtol=0)


def _peft_made_adapter(base_dir, out, use_dora: bool):
    """An adapter made by peft itself, with random A and B (and perturbed DoRA magnitudes)."""
    torch.manual_seed(1)
    conf = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj", "o_proj"],
                           use_dora=use_dora, init_lora_weights=False, lora_dropout=0.0)
    model = peft.get_peft_model(_hf(base_dir), conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return model.eval()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_made_adapter_loads_into_ours(base_dir, tmp_path, use_dora: bool) -> None:
    theirs = _peft_made_adapter(base_dir, tmp_path / "ad", use_dora)
    ours, family, cfg = load_ours(base_dir)
    files = load_adapter(ours, family.adapter(cfg), tmp_path / "ad")
    assert files.spec.dora == use_dora and len(lora_modules(ours)) == 8
    x = ids(2, 17, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs(x).logits, atol=ATOL, rtol=0)


def test_dora_gradients_match_peft(base_dir, tmp_path) -> None:
    """Same DoRA adapter in both: the loss gradients of A, B and m agree (norm detached)."""
    theirs = _peft_made_adapter(base_dir, tmp_path / "ad", use_dora=True)
    ours, family, cfg = load_ours(base_dir)
    load_adapter(ours, family.adapter(cfg), tmp_path / "ad")
    x = ids(2, 16, seed=5)
    ours(x).square().mean().backward()
    theirs(x).logits.square().mean().backward()
    suffix = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
              "lora_magnitude": "lora_magnitude_vector.default.weight"}
    hf_grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    adapter = family.adapter(cfg)
    checked = 0
    for name, mod in lora_modules(ours).items():
        hf_mod = adapter.native_key_to_hf(name + ".weight").removesuffix(".weight")
        for local, p in mod.adapter_parameters().items():
            ref = hf_grads[f"base_model.model.{hf_mod}.{suffix[local]}"]
            torch.testing.assert_close(p.grad, ref, atol=1e-6, rtol=1e-4, msg=f"{name}.{local}")
            checked += 1
    assert checked == 8 * 3


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_cli_writes_hf_model_matching_unmerged(base_dir, tmp_path, dora: bool, capsys) -> None:
    ours, family, cfg = _trained_ours(base_dir, LoRASpec(r=4, alpha=8, dora=dora), "all-linear")
    save_adapter(ours, family.adapter(cfg), tmp_path / "ad")
    assert run(["merge", str(base_dir), str(tmp_path / "ad"), "--out", str(tmp_path / "merged")]) == 0
    assert json.loads(capsys.readouterr().out)["merged_model"] == str((tmp_path / "merged").resolve())
    merged = _hf(tmp_path / "merged")
    x = ids(2, 20, seed=11)
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(merged(x).logits, expected, atol=ATOL, rtol=0)
        merge_lora(ours)  # in place, too: plain linear layers, same function
        assert not lora_modules(ours)
        torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=0)


def test_adapter_for_another_base_is_rejected(base_dir, tmp_path, capsys) -> None:
    other = save_base(tmp_path, seed=1, dim=96, n_heads=4, n_kv_heads=2)
    _peft_made_adapter(base_dir, tmp_path / "ad", use_dora=False)
    model, family, cfg = load_ours(other)
    with pytest.raises(TunesmithError, match=r"does not match the base model: .*the model needs") as e:
        load_adapter(model, family.adapter(cfg), tmp_path / "ad")
    assert "\n" not in str(e.value) and not lora_modules(model)  # nothing half-applied
    capsys.readouterr()
    assert run(["merge", str(other), str(tmp_path / "ad"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunesmith: error: adapter") and "\n" not in err, err
    assert not (tmp_path / "m").exists()
    assert run(["merge", str(other), str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err
