"""LoRA on MoE experts (tunesmith.peft.experts) on its own: init, peft's tensor layout, merging,
and the grouped-GEMM path's gradients and compiled graph against the per-expert loop (CPU
kernels; parity with transformers + peft is tests/parity/test_moe_lora_parity.py)."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.models import build_model, init_random, resolve_model_config
from tunesmith.models.moe import model as moe_model
from tunesmith.peft import LoRASpec, apply_lora, expert_lora_modules, init_adapters, merge_lora
from tunesmith.peft.experts import ExpertLoRA


def _model(dtype: torch.dtype = torch.float32, r: int = 4, seed: int = 0):
    family, cfg = resolve_model_config("moe-tiny")  # E=8, k=2, D=64, I=32, 2 sparse layers
    model = init_random(build_model(family, cfg), "cpu", dtype, seed=seed)
    apply_lora(model, family.adapter(cfg), LoRASpec(r=r, alpha=2 * r), [],
               parameters=["experts.gate_up_proj", "experts.down_proj"], adapter_dtype=dtype)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for m in expert_lora_modules(model).values():
            for lora in m.lora.values():
                lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=gen) * 0.1)
    return model


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_init_layout_and_trainable_set() -> None:
    model = _model()
    init_adapters(model, seed=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.feed_forward.experts.lora.{w}.lora_{ab}"
                         for i in (0, 1) for w in ("w13", "w2") for ab in "AB"}
    lora = model.layers[0].feed_forward.experts.lora["w13"]
    assert tuple(lora.lora_A.shape) == (8, 4, 64) and tuple(lora.lora_B.shape) == (8, 64, 4)
    assert not lora.lora_B.any()  # B = 0: a fresh adapter changes nothing
    bound = 1 / math.sqrt(64)  # peft's kaiming-uniform(a=sqrt(5)) on [E*r, in]: fan_in = in
    assert lora.lora_A.abs().max() <= bound and lora.lora_A.abs().max() > 0.9 * bound
    a, b = torch.randn(8, 4, 64), torch.randn(8, 96, 4)
    peft_t = ExpertLoRA.to_peft(a, b)
    assert peft_t["lora_A"].shape == (32, 64) and peft_t["lora_B"].shape == (96, 32)
    assert torch.equal(peft_t["lora_A"][1 * 4 + 2], a[1, 2])  # row e*r + j
    assert torch.equal(peft_t["lora_B"][:, 2 * 8 + 1], b[1, :, 2])  # column j*E + e
    back = ExpertLoRA.from_peft(peft_t["lora_A"], peft_t["lora_B"], 8)
    assert torch.equal(back["lora_A"], a) and torch.equal(back["lora_B"], b)


def test_merge_equals_unmerged_and_the_delta_is_per_expert() -> None:
    model = _model().eval()
    experts = model.layers[1].feed_forward.experts
    lora = experts.lora["w2"]
    w_before = experts.w2.detach().clone()
    delta = lora.delta_weight()
    torch.testing.assert_close(delta[5], lora.scaling * lora.lora_B[5] @ lora.lora_A[5])
    with torch.no_grad():
        expected = model(_ids())
        assert merge_lora(model) == 4 and not expert_lora_modules(model)
        torch.testing.assert_close(model(_ids()), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.layers[1].feed_forward.experts.w2, w_before + delta)


def _grads(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(ids)
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grouped_path_gradients_and_compiled_graph_equal_the_loop() -> None:
    """bf16 (the grouped GEMM's dtype): the loop, the grouped path, and the grouped path in
    compiled blocks (one full graph each, aot_eager) give the same outputs and LoRA gradients."""
    model = _model(torch.bfloat16, r=3)  # r=3: padded to 8 on the grouped path
    ids = _ids(1)
    loop_out, loop_grads = _grads(model, ids)
    moe_model.set_expert_backend("grouped")
    try:
        try:
            out, grads = _grads(model, ids)
        except RuntimeError as e:
            pytest.skip(f"torch._grouped_mm on CPU: {e}")
        for i, blk in enumerate(model.layers):
            model.layers[i] = torch.compile(blk, backend="aot_eager", fullgraph=True)
        c_out, c_grads = _grads(model, ids)
    finally:
        moe_model.set_expert_backend("auto")
    assert len(grads) == 8
    torch.testing.assert_close(out, loop_out, atol=2e-2, rtol=2e-2)
    for n, g in grads.items():
        scale = loop_grads[n].abs().max()
        assert (g - loop_grads[n]).abs().max() <= 0.02 * scale, n
    assert torch.equal(c_out, out)
    for n, g in c_grads.items():
        torch.testing.assert_close(g, grads[n.replace("._orig_mod", "")], atol=0, rtol=0)
