"""float8 training transform, float8 LoRA base, low-memory optimizers: structure, numerics on
CPU (torch._scaled_mm runs there; torchao's float8 training in its emulate mode) and refusals.
The float8 speed and GPU-only paths are measured by benchmarks/bench_lowmem.py on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.peft_utils import QLORA_SHAPE, ids, tiny_model
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.peft import LoRALinear, LoRASpec, apply_lora, merge_lora
from tunesmith.peft.float8 import Float8FrozenLinear, dequantize, linear_float8, quantize_rows
from tunesmith.peft.transform import float8_base
from tunesmith.optim import build_optimizer
from tunesmith.transforms.float8 import convert_float8, float8_targets, require_float8

pytest.importorskip("torchao")

# Widths that are multiples of 16 (float8 GEMMs): dim 128, kv 128, ffn 256.
F8_SHAPE = QLORA_SHAPE


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||."""
    return float((a - b).detach().norm() / b.detach().norm())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0))


def _cfg(*overrides: str):
    return load_config(None, ["data.path=x", *overrides])


# ------------------------------------------------------------------ float8 training transform

def test_float8_rule_default_skips_head_and_small_layers() -> None:
    model, _, _ = tiny_model(**F8_SHAPE)
    assert float8_targets(model, "tensorwise", "auto") == []  # 128-wide layers gain nothing
    every = float8_targets(model, "tensorwise", "all")
    assert len(every) == 14 and "output" not in every  # 7 linears x 2 blocks, never the head
    assert "output" in float8_targets(model, "tensorwise", "all", skip=[])
    kept = float8_targets(model, "rowwise", "all", skip=["output", "layers.0.*", "*.w2"])
    assert kept == [f"layers.1.{n}" for n in ("attention.wq", "attention.wk", "attention.wv",
                                              "attention.wo", "feed_forward.w1", "feed_forward.w3")]
    odd, _, _ = tiny_model()  # intermediate_size 96 is a multiple of 16 -> all kept; dim 64 too
    assert all(n.startswith("layers.") for n in float8_targets(odd, "tensorwise", "all"))


def test_float8_rule_auto_follows_torchao_thresholds() -> None:
    shape = dict(F8_SHAPE, dim=1024, n_heads=8, n_kv_heads=2, intermediate_size=4096, n_layers=1)
    model, _, _ = tiny_model(**shape)  # meta init would be nicer, but 1 block is small enough
    tw = float8_targets(model, "tensorwise", "auto")
    # wk/wv [256, 1024]: in <= 4096 and out <= 1024 -> bf16; w1/w3 [4096, 1024] convert.
    assert "layers.0.attention.wk" not in tw and "layers.0.feed_forward.w1" in tw
    rw = float8_targets(model, "rowwise", "auto")
    assert rw == []  # rowwise needs out > 2048 and in > 1024 (w1/w3 have in 1024)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_conversion_keeps_parameters_and_tracks_bf16(recipe: str) -> None:
    model, _, _ = tiny_model(**F8_SHAPE)
    ref, _, _ = tiny_model(**F8_SHAPE)
    names = convert_float8(model, recipe, "all", emulate=True)
    assert type(model.get_submodule(names[0])).__name__ == "Float8Linear"
    assert type(model.output) is nn.Linear
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = model(x).float(), ref(x).float()
    # e4m3 keeps 3 mantissa bits; these weights (std 0.15, width 128) amplify through 2 blocks:
    # ~9% relative error here (bf16 alone: 0.8%); a wrong scale or layout would give ~100%.
    assert _rel(out, want) < 0.15 and _cos(out, want) > 0.99
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_float8_refuses_cpu_and_impossible_configs() -> None:
    with pytest.raises(TunesmithError, match=r"train.float8=tensorwise needs a CUDA GPU.*cpu"):
        require_float8(torch.device("cpu"), "train.float8=tensorwise")
    model, _, _ = tiny_model(**F8_SHAPE)
    with pytest.raises(TunesmithError, match="no linear layer qualifies"):
        convert_float8(model, "tensorwise", "auto", emulate=True)
    for bad, msg in [
        (["train.float8=tensorwise", "train.precision=fp16"], "bf16 or bf16-pure"),
        (["train.float8=rowwise", "peft.method=lora"], "peft.base_dtype=float8"),
        (["train.float8_all_gather=true", "train.float8=rowwise"], "float8=tensorwise"),
        (["peft.base_dtype=float8", "peft.method=qlora"], "lora or dora"),
        (["optim.bf16_stochastic_round=true"], "bf16-pure"),
        (["optim.name=adamw8bit", "optim.fused=true"], "adamw only"),
    ]:
        with pytest.raises(Exception, match=msg):
            _cfg(*bad)


def test_cli_float8_on_cpu_is_one_line_exit_2(tmp_path, tiny_tokenizer_dir, demo_text, capsys) -> None:
    from tests.conftest import tiny_overrides
    from tunesmith.cli.main import run

    for opt in ("train.float8=tensorwise", "peft.base_dtype=float8"):
        extra = {"train.precision": "bf16", "train.device": "cpu"}
        if opt.startswith("peft"):
            extra["peft.method"] = "lora"
        out = tmp_path / opt
        code = run(["train", *tiny_overrides(tiny_tokenizer_dir, out, demo_text[0], **extra), opt])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "compute capability >= 8.9" in err[0], err
        assert not out.exists()  # refused before anything was written


# ------------------------------------------------------------------ float8 LoRA base

def test_quantize_rows_round_trips_within_e4m3_precision() -> None:
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different size
    w8, s = quantize_rows(w)
    assert w8.dtype == torch.float8_e4m3fn and s.shape == (64, 1)
    rel = (dequantize(w8, s, torch.float32) - w) / w.abs().amax(dim=1, keepdim=True)
    assert rel.abs().max() < 2 ** -4  # e4m3: 3 mantissa bits, per-row scale


def test_float8_base_matmul_and_input_grad_match_bf16() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.1
    x = torch.randn(3, 5, 64, requires_grad=True)
    w8, s = quantize_rows(w)
    y = linear_float8(x, w8, s)
    g = torch.randn_like(y)
    y.backward(g)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ dequantize(w8, s, torch.float32).t()
    y_ref.backward(g)
    assert y.shape == (3, 5, 48) and x.grad.shape == x.shape
    assert (y - y_ref).abs().max() < 0.08 * y_ref.abs().max()
    assert (x.grad - x_ref.grad).abs().max() < 0.08 * x_ref.grad.abs().max()
    assert torch.nn.functional.cosine_similarity(x.grad.flatten(), x_ref.grad.flatten(), dim=0) > 0.998


@pytest.mark.parametrize("dora", [False, True])
def test_lora_on_float8_base_trains_adapters_only(dora: bool) -> None:
    model, family, cfg = tiny_model(**F8_SHAPE)
    ref, _, _ = tiny_model(**F8_SHAPE)
    n, dense = float8_base(model, family.adapter(cfg))
    assert n == 14 and dense == [] and type(model.output) is nn.Linear  # never the LM head
    apply_lora(model, family.adapter(cfg), LoRASpec(r=4, alpha=8, dora=dora), ["wq", "w2"])
    wq, wk = model.layers[0].attention.wq, model.layers[0].attention.wk
    assert isinstance(wq, LoRALinear) and wq.float8 and wq.weight.dtype == torch.float8_e4m3fn
    assert isinstance(wk, Float8FrozenLinear)
    assert "weight_scale" not in "".join(model.state_dict())  # same keys as the dense base
    base = wq.weight.detach().clone()
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        want = ref(x).detach()
    assert _rel(out.float(), want.float()) < 0.15 and _cos(out.float(), want.float()) > 0.99
    out.float().sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(wq.weight, base)
    merged = merge_lora(model)
    assert merged == 4 and type(model.layers[0].attention.wk) is nn.Linear
    assert model.layers[0].attention.wk.weight.dtype == torch.bfloat16


def test_float8_base_leaves_unaligned_layers_dense() -> None:
    model, family, cfg = tiny_model(intermediate_size=104)  # 104 is not a multiple of 16
    n, dense = float8_base(model, family.adapter(cfg))
    assert n == 8 and sorted(dense) == [f"layers.{i}.feed_forward.{w}" for i in (0, 1) for w in ("w1", "w2", "w3")]


# ------------------------------------------------------------------ low-memory optimizers

@pytest.mark.parametrize(("name", "state"), [("adamw8bit", "OptimState8bit"), ("adamw4bit", "OptimState4bit")])
def test_lowbit_adamw_quantizes_big_moments_only(name: str, state: str) -> None:
    model, _, _ = tiny_model(**F8_SHAPE)
    opt = build_optimizer(model, _cfg(f"optim.name={name}").optim, torch.device("cpu"))
    model(ids()).float().sum().backward()
    opt.step()
    big = opt.state[model.layers[0].feed_forward.w1.weight]  # 256 x 128 values
    small = opt.state[model.layers[0].attention_norm.weight]  # 128 values: plain fp32
    assert type(big["exp_avg"]).__name__ == state and type(big["exp_avg_sq"]).__name__ == state
    assert type(small["exp_avg"]) is torch.Tensor and small["exp_avg"].dtype == torch.float32


def test_bf16_stochastic_rounding_keeps_updates_below_bf16_spacing() -> None:
    """lr * update = 1e-4 on weights near 1.0 (bf16 spacing 2^-7 ~ 7.8e-3): round-to-nearest
    never moves them; stochastic rounding moves them on average by the fp32 amount."""
    torch.manual_seed(0)
    results = {}
    for sr in (False, True):
        p = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        cfg = _cfg("train.precision=bf16-pure", f"optim.bf16_stochastic_round={str(sr).lower()}",
                   "optim.lr=1e-4", "optim.betas=[0.0, 0.999]").optim
        opt = build_optimizer(nn.ParameterList([nn.Parameter(torch.zeros(2, 2048, dtype=torch.bfloat16)), p]),
                              cfg, torch.device("cpu"))
        for _ in range(20):
            for q in (opt.param_groups[0]["params"] + opt.param_groups[-1]["params"]):
                q.grad = torch.ones_like(q)
            opt.step()
        results[sr] = 1.0 - p.float().mean().item()
    assert results[False] == 0.0  # every update lost
    assert results[True] == pytest.approx(20 * 1e-4, rel=0.15)
