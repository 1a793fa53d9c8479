"""The MoE family's config, presets, counts, adapter and refusals (parity with transformers is in
tests/parity/test_moe_parity.py)."""

from __future__ import annotations

import pytest
import torch

from tests.parity.helpers import grouped_forward
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.models import build_model, init_random, resolve_model_config
from tunesmith.models.moe import model as moe_model
from tunesmith.models.moe.config import MoEConfig, apply_overrides, preset
from tunesmith.parallel.layout import check_run, resolve_layout
from tunesmith.peft.targets import select_expert_targets, select_targets

transformers = pytest.importorskip("transformers")


def _active_and_total(name: str) -> tuple[float, float]:
    family, cfg = resolve_model_config(name)
    model = build_model(family, cfg, "meta")
    emb = cfg.vocab_size * cfg.dim
    # flops_per_token = 6 N_active + 12 L H hd T; N_active excludes the embedding lookup
    n_active = (model.flops_per_token(0)) / 6 + emb
    return n_active / 1e9, model.num_params() / 1e9


def test_presets_have_the_published_sizes() -> None:
    # Mixtral-8x7B: 46.7B parameters, 12.9B active; Qwen3-30B-A3B: 30.5B total, 3.3B active
    active, total = _active_and_total("mixtral-8x7b")
    assert total == pytest.approx(46.7, rel=0.01) and active == pytest.approx(12.9, rel=0.01)
    active, total = _active_and_total("qwen3-30b-a3b")
    assert total == pytest.approx(30.5, rel=0.01) and active == pytest.approx(3.3, rel=0.03)


def test_flops_count_active_experts_and_dense_layers() -> None:
    cfg = preset("moe-tiny")
    cfg = apply_overrides(cfg, {"n_layers": 3, "mlp_only_layers": [1]})
    d, e, k, i, i_dense = cfg.dim, cfg.num_experts, cfg.num_experts_per_tok, 32, 128
    attn = d * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    per_layer = [attn + d * e + k * 3 * d * i, attn + 3 * d * i_dense, attn + d * e + k * 3 * d * i]
    model = build_model(*resolve_model_config("moe-tiny", {"n_layers": 3, "mlp_only_layers": [1]}), "meta")
    expected = 6 * (sum(per_layer) + cfg.vocab_size * d) + 12 * 3 * cfg.n_heads * cfg.head_dim * 64
    assert model.flops_per_token(64) == expected
    stored = sum(p.numel() for p in model.parameters())
    assert model.num_params() == stored  # every expert counts in the total


def test_overrides_take_hf_names_and_keep_mixtral_experts_dense_width() -> None:
    cfg = apply_overrides(preset("mixtral-8x7b"), {"num_local_experts": 4, "intermediate_size": 256,
                                                  "num_hidden_layers": 2})
    assert (cfg.num_experts, cfg.moe_intermediate_size, cfg.n_layers) == (4, 256, 2)
    cfg = apply_overrides(preset("qwen3-30b-a3b"), {"num_experts": 16, "moe_intermediate_size": 64})
    assert (cfg.num_experts, cfg.moe_intermediate_size, cfg.intermediate_size) == (16, 64, 6144)
    with pytest.raises(TunesmithError, match="did you mean 'num_experts'"):
        apply_overrides(preset("moe-tiny"), {"num_expert": 4})


@pytest.mark.parametrize("name,hf_cls", [("mixtral-8x7b", "MixtralConfig"),
                                          ("qwen3-30b-a3b", "Qwen3MoeConfig"),
                                          ("moe-tiny", "Qwen3MoeConfig")])
def test_config_round_trips_through_transformers(name: str, hf_cls: str) -> None:
    cfg = preset(name)
    hf = getattr(transformers, hf_cls)(**cfg.to_hf())
    back = MoEConfig.from_hf(hf.to_dict())
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
                  "moe_intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob",
                  "rope_theta", "norm_eps", "decoder_sparse_step", "mlp_only_layers",
                  "router_aux_loss_coef", "vocab_size", "model_type", "attention_bias"):
        assert getattr(back, field) == getattr(cfg, field), field
    assert hf.num_experts_per_tok == cfg.num_experts_per_tok


@pytest.mark.parametrize("hf,match", [
    ({"model_type": "mixtral", "router_jitter_noise": 0.1}, "router_jitter_noise"),
    ({"model_type": "qwen3_moe", "use_sliding_window": True}, "use_sliding_window"),
    ({"model_type": "qwen3_moe", "hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "qwen3_moe", "num_experts": 2, "num_experts_per_tok": 3}, "exceeds num_experts"),
    ({"model_type": "qwen3_moe", "num_hidden_layers": 2, "mlp_only_layers": [5]}, "mlp_only_layers"),
    ({"model_type": "llama"}, "not an MoE model"),
])
def test_bad_hf_configs_are_refused(hf: dict, match: str) -> None:
    with pytest.raises(TunesmithError, match=match):
        MoEConfig.from_hf({"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64,
                           "num_hidden_layers": 2, "vocab_size": 64, **hf})


def test_overrides_hf_cannot_express_are_refused() -> None:
    with pytest.raises(TunesmithError, match="HF mixtral has sparse layers only"):
        apply_overrides(preset("mixtral-8x7b"), {"mlp_only_layers": [0]})
    with pytest.raises(TunesmithError, match="HF mixtral cannot express .*attention_bias=True"):
        apply_overrides(preset("mixtral-8x7b"), {"attention_bias": True})
    with pytest.raises(TunesmithError, match="HF qwen3_moe cannot express .*mlp_bias=True"):
        apply_overrides(preset("moe-tiny"), {"mlp_bias": True})


def test_lora_targets_linear_layers_and_experts_only_by_parameter_name() -> None:
    family, cfg = resolve_model_config("moe-tiny", {"mlp_only_layers": [1]})
    model = build_model(family, cfg, "meta")
    adapter = family.adapter(cfg)
    names = {c.native for c in select_targets(model, adapter, "all-linear")}
    assert "layers.0.attention.wq" in names and "layers.1.feed_forward.w1" in names  # dense layer
    assert not any("router" in n or "experts" in n for n in names)
    with pytest.raises(TunesmithError, match="match no linear layer.*experts and the router of these "
                                             "MoE models are not linear layers.*peft.target_parameters"):
        select_targets(model, adapter, ["experts"])
    picked = select_expert_targets(model, adapter, ["experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"])
    assert [t.native for t in picked] == ["layers.0.feed_forward.experts.w13",
                                          "layers.0.feed_forward.experts.w2"]  # layer 1 is dense
    llama_family, llama_cfg = resolve_model_config("tiny")
    with pytest.raises(TunesmithError, match="has no stacked expert weights"):
        select_expert_targets(build_model(llama_family, llama_cfg, "meta"), llama_family.adapter(llama_cfg), ["w13"])


def test_loop_and_grouped_kernels_agree_on_cpu_forward() -> None:
    """The CUDA grouped-GEMM path against the per-expert loop (forward; torch 2.13's CPU
    kernel; the CUDA bf16 check with gradients is benchmarks/moe_device.py)."""
    family, cfg = resolve_model_config("moe-tiny")
    model = init_random(build_model(family, cfg), "cpu", torch.float32, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loop = model(ids)
    torch.testing.assert_close(grouped_forward(model, ids), loop, atol=1e-5, rtol=1e-5)
    with pytest.raises(TunesmithError, match="unknown expert backend"):
        moe_model.set_expert_backend("fast")


def _check(overrides: list[str], world: int = 1, **layout) -> None:
    cfg = load_config(None, ["model.name=moe-tiny", "data.path=x.txt", *overrides])
    _, model_cfg = resolve_model_config(cfg.model.name, cfg.model.overrides)
    check_run(cfg, resolve_layout(cfg.parallel, world, world), model_cfg, "cpu")


def test_refusals_in_one_line() -> None:
    _check(["parallel.tp=2", "data.block_size=64"], world=2)  # TP and EP serve the MoE family
    _check(["parallel.ep=2"], world=2)
    with pytest.raises(TunesmithError, match="parallel.tp=2 must divide the model's num_experts=3"):
        _check(["parallel.tp=2", "data.block_size=64", "model.overrides={num_experts: 3}"], world=2)
    _check(["parallel.cp=2"], world=2)  # ring attention; the aux loss sums over the cp ranks
    with pytest.raises(TunesmithError, match="router_aux_loss_coef with parallel.mlp_chunk_size"):
        _check(["train.router_aux_loss_coef=0.01", "parallel.mlp_chunk_size=64"])
    cfg = load_config(None, ["model.name=tiny", "data.path=x.txt", "train.router_aux_loss_coef=0.01"])
    _, llama_cfg = resolve_model_config("tiny")
    with pytest.raises(TunesmithError, match="has no experts"):
        check_run(cfg, resolve_layout(cfg.parallel, 1, 1), llama_cfg, "cpu")
    experts = "peft.target_parameters=[experts.gate_up_proj]"
    for extra, match in ((["peft.method=dora"], "needs peft.method=lora or qlora, not dora"),
                         (["peft.method=lora", "peft.dropout=0.05"], "needs peft.dropout=0"),
                         (["peft.method=lora", "peft.base_dtype=float8"], "base_dtype=float8 is not")):
        with pytest.raises(TunesmithError, match=r"peft.target_parameters \(LoRA on MoE experts\) .*" + match):
            load_config(None, ["model.name=moe-tiny", "data.path=x.txt", experts, *extra])
    assert load_config(None, ["model.name=moe-tiny", "data.path=x.txt", experts, "peft.method=qlora"]).peft.method == "qlora"
    with pytest.raises(TunesmithError, match="target_modules is empty"):
        load_config(None, ["model.name=moe-tiny", "data.path=x.txt", "peft.method=lora", "peft.target_modules=[]"])
    with pytest.raises(TunesmithError, match="task=dpo: train.router_aux_loss_coef"):
        load_config(None, ["model.name=moe-tiny", "task=dpo", "data.path=x.jsonl",
                           "train.router_aux_loss_coef=0.01"])
