"""LoRA on MoE experts (peft's target_parameters / ParamWrapper) vs transformers + peft: logits
and LoRA gradients, PEFT-format adapters both ways, merging, and the grouped-GEMM path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tests.parity.helpers import grouped_forward, load_ours  # noqa: E402
from tunesmith.cli.main import run  # noqa: E402
from tunesmith.errors import TunesmithError  # noqa: E402
from tunesmith.models import resolve_model_config  # noqa: E402
from tunesmith.peft import (  # noqa: E402
    LoRASpec,
    adapters_disabled,
    apply_lora,
    expert_lora_modules,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
)
from tunesmith.peft.experts import ExpertLoRA  # noqa: E402

ATOL = 1e-5
VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _hf_config(name: str) -> transformers.PretrainedConfig:
    if name == "mixtral":  # every layer sparse, top-2 of 4
        return transformers.MixtralConfig(**COMMON, num_hidden_layers=2, num_local_experts=4,
                                          num_experts_per_tok=2, sliding_window=None)
    # Qwen3-MoE: top-2 of 8 not renormalised, layer 1 dense (its MLP is a plain linear target)
    return transformers.Qwen3MoeConfig(**COMMON, num_hidden_layers=3, head_dim=8, num_experts=8,
                                       num_experts_per_tok=2, moe_intermediate_size=16,
                                       norm_topk_prob=False, mlp_only_layers=[1])


NAMES = ["mixtral", "qwen3_moe"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for i, name in enumerate(NAMES):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(_hf_config(name), attn_implementation="eager")
        with torch.no_grad():  # O(1) activations so parity is meaningful
            for n, p in model.named_parameters():
                p.normal_(1.0, 0.1) if "norm" in n else p.normal_(0.0, 0.2)
        out[name] = tmp_path_factory.mktemp(f"base_{name}")
        model.save_pretrained(out[name])
    return out


def _hf(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _peft_made(base: Path, out: Path, targets: list[str], params: list[str]) -> torch.nn.Module:
    """An adapter made by peft itself with random A and B (init_lora_weights=False)."""
    torch.manual_seed(3)
    conf = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, target_parameters=params,
                           init_lora_weights=False)
    model = peft.get_peft_model(_hf(base), conf)
    model.save_pretrained(out)
    return model.eval()


def _ours_with_random_adapters(base: Path, spec: LoRASpec, targets, params, **kw):
    model = load_ours(base)
    family, cfg = resolve_model_config(str(base))
    apply_lora(model, family.adapter(cfg), spec, targets, parameters=params, **kw)
    with torch.no_grad():  # B != 0, so the adapters change the outputs
        gen = torch.Generator().manual_seed(5)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval(), family.adapter(cfg)


@pytest.mark.parametrize("name", NAMES)
def test_peft_made_adapter_loads_into_ours_with_equal_logits_and_grads(bases, tmp_path, name) -> None:
    theirs = _peft_made(bases[name], tmp_path / "ad", ["q_proj", "v_proj"], EXPERTS)
    ours = load_ours(bases[name])
    family, cfg = resolve_model_config(str(bases[name]))
    load_adapter(ours, family.adapter(cfg), tmp_path / "ad")
    sparse = 2
    assert len(expert_lora_modules(ours)) == sparse and all(
        set(m.lora) == {"w13", "w2"} for m in expert_lora_modules(ours).values())
    x = _ids(2, 13, seed=1)
    ours.eval()(x).square().mean().backward()
    theirs(x).logits.square().mean().backward()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=ATOL, rtol=0)
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    checked = 0
    for path, mod in expert_lora_modules(ours).items():
        hf_mod = "base_model.model.model." + path.replace("feed_forward", "mlp")
        for w, where in (("w13", hf_mod + ".base_layer"), ("w2", hf_mod)):
            lora = mod.lora[w]
            ours_peft = ExpertLoRA.to_peft(lora.lora_A.grad, lora.lora_B.grad)
            for local in ("lora_A", "lora_B"):
                ref = grads[f"{where}.{local}.default.weight"]
                torch.testing.assert_close(ours_peft[local], ref, atol=1e-6, rtol=1e-4, msg=f"{path}.{w}.{local}")
                checked += 1
    for path, mod in lora_modules(ours).items():
        ref = grads["base_model.model.model." + path.replace("attention.wq", "self_attn.q_proj")
                    .replace("attention.wv", "self_attn.v_proj") + ".lora_B.default.weight"]
        torch.testing.assert_close(mod.lora_B.grad, ref, atol=1e-6, rtol=1e-4)
    assert checked == sparse * 2 * 2


@pytest.mark.parametrize(("name", "spec", "targets", "params", "skip", "want_params"), [
    ("mixtral", LoRASpec(r=3, alpha=4, rslora=True), "all-linear", ["experts.w13", "w2"], set(), EXPERTS),
    # (not all-linear: peft reads gate_proj / up_proj / down_proj in a Qwen3-MoE adapter's
    # target_modules as transformers 4's expert names, so the dense layer's would be remapped)
    ("qwen3_moe", LoRASpec(r=4, alpha=8), ["q_proj", "o_proj"], ["gate_up_proj", "down_proj"], set(), EXPERTS),
    # one weight per module: peft stores it without a base_layer level
    ("qwen3_moe", LoRASpec(r=2, alpha=2), [], ["down_proj"], set(), ["experts.down_proj"]),
    # frozen block 0: only layer 2's experts, named by full path so peft picks the same set
    ("qwen3_moe", LoRASpec(r=2, alpha=4), ["k_proj"], EXPERTS, {0},
     ["model.layers.2.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj"]),
], ids=["mixtral-all-linear-rslora", "qwen3-both", "qwen3-down-only", "qwen3-block-subset"])
def test_our_adapter_loads_in_peft_with_equal_logits(bases, tmp_path, name, spec, targets, params,
                                                     skip, want_params) -> None:
    ours, adapter = _ours_with_random_adapters(bases[name], spec, targets, params, skip_blocks=skip)
    save_adapter(ours, adapter, tmp_path / "ad", base_model=str(bases[name]))
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["target_parameters"] == want_params and conf["lora_dropout"] == 0
    theirs = peft.PeftModel.from_pretrained(_hf(bases[name]), tmp_path / "ad").eval()
    wrapped = sum(1 for n, m in theirs.named_modules() if type(m).__name__ == "ParamWrapper")
    assert wrapped == sum(len(m.lora) for m in expert_lora_modules(ours).values())
    x = _ids(3, 11, seed=2)
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(theirs(x).logits, expected, atol=ATOL, rtol=0)
        with adapters_disabled(ours):  # task=dpo's reference: the frozen base alone
            torch.testing.assert_close(ours(x), _hf(bases[name])(x).logits, atol=ATOL, rtol=0)
    again = load_ours(bases[name])  # and back into ours
    load_adapter(again, adapter, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_merge_folds_expert_adapters(bases, tmp_path, name, capsys) -> None:
    ours, adapter = _ours_with_random_adapters(bases[name], LoRASpec(r=4, alpha=8), ["q_proj"], EXPERTS)
    save_adapter(ours, adapter, tmp_path / "ad")
    assert run(["-q", "merge", str(bases[name]), str(tmp_path / "ad"), "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    x = _ids(2, 9, seed=4)
    with torch.no_grad():
        expected = ours(x)
        assert (expected - _hf(bases[name])(x).logits).abs().max() > 1e-2  # the adapter matters
        torch.testing.assert_close(_hf(tmp_path / "m")(x).logits, expected, atol=ATOL, rtol=0)
        n = len(lora_modules(ours)) + sum(len(m.lora) for m in expert_lora_modules(ours).values())
        assert n == len(ours.layers) + 2 * 2 and merge_lora(ours) == n and not expert_lora_modules(ours)
        torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=0)


def test_grouped_path_equals_loop_on_cpu(bases) -> None:
    """The grouped-GEMM experts with the low-rank update (rank 3: padded to 8 there) against the
    per-expert loop (forward on torch's CPU kernel; CUDA bf16 with gradients:
    benchmarks/moe_lora_device.py)."""
    ours, _ = _ours_with_random_adapters(bases["qwen3_moe"], LoRASpec(r=3, alpha=6), [], EXPERTS)
    x = _ids(2, 16, seed=6)
    with torch.no_grad():
        loop = ours(x)
    torch.testing.assert_close(grouped_forward(ours, x), loop, atol=1e-5, rtol=1e-5)


def test_refusals_are_typed_and_one_line(bases, tmp_path) -> None:
    model = load_ours(bases["mixtral"])
    family, cfg = resolve_model_config(str(bases["mixtral"]))
    adapter = family.adapter(cfg)
    for spec, params, match in (
            (LoRASpec(r=2, alpha=4, dora=True), EXPERTS, "does not support DoRA"),
            (LoRASpec(r=2, alpha=4, dropout=0.1), EXPERTS, "needs peft.dropout=0"),
            (LoRASpec(r=2, alpha=4), ["experts.up_proj"],
             r"\['experts.up_proj'\] match no expert weight; candidates: w13, w2, down_proj, gate_up_proj")):
        with pytest.raises(TunesmithError, match=match) as e:
            apply_lora(model, adapter, spec, ["q_proj"], parameters=params)
        assert "\n" not in str(e.value)
    assert not lora_modules(model) and not expert_lora_modules(model)  # nothing half-applied
    # an adapter whose expert tensors do not fit this base
    _peft_made(bases["mixtral"], tmp_path / "ad", ["q_proj"], EXPERTS)
    qwen = load_ours(bases["qwen3_moe"])
    fam, qcfg = resolve_model_config(str(bases["qwen3_moe"]))
    with pytest.raises(TunesmithError, match="does not match the base model: .*the model needs"):
        load_adapter(qwen, fam.adapter(qcfg), tmp_path / "ad")
    assert not expert_lora_modules(qwen)
