"""QLoRA on MoE experts (tunesmith.peft.quant_experts): NF4 expert stacks against a reference
holding their dequantised values (outputs and LoRA gradients, loop and grouped paths), the
memory contract (only NF4 storage saved for backward, eager and compiled + AC), merging, and
the parameter bytes of an assembled model against the formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.peft_utils import compile_or_skip, watch_nf4_backward
from tunesmith.config import load_config
from tunesmith.models import build_model, init_random, resolve_model_config
from tunesmith.models.moe import model as moe_model
from tunesmith.parallel import apply_activation_checkpointing
from tunesmith.peft import (
    LoRALinear,
    LoRASpec,
    apply_lora,
    merge_lora,
    nf4_available,
    quant,
    quantize_base,
)
from tunesmith.peft.experts import LoRAExperts, dense_weight, expert_lora_modules
from tunesmith.peft.lora import NF4Linear
from tunesmith.peft.quant_experts import NF4Experts, QLoRAExperts
from tunesmith.runtime import Runtime

pytestmark = pytest.mark.skipif(not nf4_available(), reason="torchao with NF4Tensor is not installed")

# moe-tiny with NF4-friendly widths: every attention / dense weight holds 16,384 elements and the
# expert stacks w13 [8, 64, 128], w2 [8, 128, 32] are multiples of 64 x 256.
QSHAPE = {"dim": 128, "n_heads": 2, "n_kv_heads": 2, "head_dim": 64}
QSHAPE_CLI = ["model.overrides={dim: 128, n_heads: 2, n_kv_heads: 2, head_dim: 64}"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _qlora_model(targets="all-linear", params=EXPERTS, seed: int = 0) -> nn.Module:
    """bf16 moe-tiny, NF4 base, adapters with random B (so they change the outputs)."""
    torch.manual_seed(seed)  # the adapters' A draws from the global generator, as peft's
    family, cfg = resolve_model_config("moe-tiny", QSHAPE)
    model = init_random(build_model(family, cfg), "cpu", torch.bfloat16, seed=seed)
    quantize_base(model, family.adapter(cfg))
    apply_lora(model, family.adapter(cfg), LoRASpec(r=4, alpha=8), targets, parameters=params,
               adapter_dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@torch.no_grad()
def _dequantised_reference(model: nn.Module) -> nn.Module:
    """The same model on a plain bf16 base holding the NF4 values (shared adapter tensors)."""
    import copy

    ref = copy.deepcopy(model)
    for name, mod in list(ref.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if isinstance(mod, LoRALinear) and mod.quantized:
            mod.weight = nn.Parameter(quant.dequantize(mod.weight, torch.bfloat16), requires_grad=False)
            mod.quantized = False
        elif isinstance(mod, NF4Linear):
            setattr(ref.get_submodule(parent), leaf, mod.to_linear())
        elif isinstance(mod, NF4Experts):
            plain = NF4Experts.to_experts(mod)  # dequantised only, adapters not folded
            if isinstance(mod, QLoRAExperts):
                new = LoRAExperts.__new__(LoRAExperts)
                nn.Module.__init__(new)
                new.w13, new.w2, new.spec, new.shapes, new.lora = plain.w13, plain.w2, mod.spec, mod.shapes, mod.lora
                plain = new
            setattr(ref.get_submodule(parent), leaf, plain)
    assert not any(quant.is_nf4(p) for p in ref.parameters())
    return ref


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


def _run(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(ids)
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_assembly_stores_experts_in_nf4_and_keeps_the_router() -> None:
    model = _qlora_model()
    for i in range(2):
        ff = model.layers[i].feed_forward
        assert isinstance(ff.experts, QLoRAExperts)
        assert quant.is_nf4(ff.experts.w13) and tuple(ff.experts.w13.shape) == (8 * 64, 128)
        assert ff.experts.weight_shape("w2") == (8, 128, 32) and quant.is_nf4(ff.experts.w2)
        assert ff.router.weight.dtype == torch.bfloat16 and not quant.is_nf4(ff.router.weight)
        assert isinstance(model.layers[i].attention.wq, LoRALinear) and model.layers[i].attention.wq.quantized
    lora = model.layers[0].feed_forward.experts.lora["w13"]
    assert tuple(lora.lora_A.shape) == (8, 4, 128) and tuple(lora.lora_B.shape) == (8, 64, 4)


@pytest.mark.parametrize("backend", ["loop", "grouped"])
@pytest.mark.parametrize(("targets", "params"), [("all-linear", EXPERTS), ("all-linear", []), ([], EXPERTS)],
                         ids=["both", "attention-only", "experts-only"])
def test_nf4_experts_equal_the_dequantised_reference(backend, targets, params) -> None:
    """Forward and every LoRA gradient equal a bf16 model holding the NF4 values: the op runs
    the same per-expert matmuls (loop) or grouped GEMM on the same bf16 weights."""
    model = _qlora_model(targets, params)
    ref = _dequantised_reference(model)
    ids = _ids(1)
    moe_model.set_expert_backend(backend)
    try:
        try:
            out, grads = _run(model, ids)
        except RuntimeError as e:
            if backend == "grouped":
                pytest.skip(f"torch._grouped_mm on CPU: {e}")
            raise
        ref_out, ref_grads = _run(ref, ids)
    finally:
        moe_model.set_expert_backend("auto")
    assert set(grads) == set(ref_grads) and grads
    assert any(".experts.lora." in n for n in grads) == bool(params)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=0, rtol=0, msg=n)


@pytest.mark.parametrize(("compiled", "ac"), [(False, False), (True, True)], ids=["eager", "compiled-ac"])
def test_only_nf4_storage_is_saved_for_backward(monkeypatch, compiled: bool, ac: bool) -> None:
    """Under bf16 autocast no dense expert stack (nor any dense weight) is saved for backward,
    and each projection dequantises on use and frees it: at most one dense copy at a time."""
    if compiled:
        compile_or_skip()
        torch._dynamo.reset()
    model = _qlora_model()
    if ac:
        apply_activation_checkpointing(model)
    if compiled:
        for block in model.layers:
            block.compile()
    dense = {(8, 64, 128), (8, 128, 64), (512, 128), (8, 128, 32), (8, 32, 128), (1024, 32), (128, 128)}
    rt = Runtime(torch.device("cpu"), "bf16", torch.float32, torch.bfloat16)
    watch = watch_nf4_backward(model, monkeypatch, rt, _ids)
    assert watch.saved
    leaked = [(s, d) for s, d in watch.saved if s in dense and d in (torch.bfloat16, torch.float32)]
    assert not leaked, f"dense weights saved for backward: {leaked}"
    assert watch.peak == 1 and watch.live == 0
    # 2 layers x (4 attention + 2 expert stacks) dequantised in forward, again in backward (but
    # layer 0's q/k/v, whose input needs no gradient: the embedding is frozen), and once more in
    # forward under activation checkpointing's recompute
    assert watch.calls == 2 * 6 * (2 if ac else 1) + 2 * 6 - 3
    grads = [p.grad for n, p in model.named_parameters() if ".experts.lora." in n]
    assert len(grads) == 8 and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    if compiled:
        torch._dynamo.reset()


def test_merge_folds_adapters_into_dequantised_experts() -> None:
    model = _qlora_model().eval()
    ids = _ids(2)
    with torch.no_grad():
        expected = model(ids)
        experts = model.layers[1].feed_forward.experts
        w2 = dense_weight(experts, "w2", torch.float32) + experts.lora["w2"].delta_weight()
        assert merge_lora(model) == 2 * 4 + 2 * 2  # per layer: q, k, v, o; w13, w2
        assert not expert_lora_modules(model) and not any(quant.is_nf4(p) for p in model.parameters())
        merged = model.layers[1].feed_forward.experts
        assert type(merged) is moe_model.Experts and merged.w2.dtype == torch.bfloat16
        torch.testing.assert_close(merged.w2, w2.to(torch.bfloat16), atol=0, rtol=0)
        # s B A rounded into bf16 W: logits agree to bf16 rounding, except where a token's
        # top-2 experts were a near-tie and now route differently
        close = (model(ids).float() - expected.float()).abs().amax(-1) < 3e-2  # [B, T]
        assert close.float().mean() >= 0.9, close


def _nf4_bytes(numel: int) -> int:
    """torchao NF4 storage of a weight: 4-bit codes, an int8 scale per 64 elements, a bf16
    factor per 64 x 256, the bf16 scale mean and 16 bf16 code values (~0.516 bytes/element)."""
    return numel // 2 + numel // 64 + 2 * (numel // (64 * 256)) + 2 + 16 * 2


def test_parameter_bytes_are_the_formula(tmp_path) -> None:
    """The assembled QLoRA model (pipeline, meta -> materialize): NF4 experts and attention,
    bf16 router / norms / embedding, fp32 adapters -- byte for byte."""
    from tunesmith.build.pipeline import assemble

    (tmp_path / "x.txt").write_text("hello world\n" * 8)
    cfg = load_config(None, ["model.name=moe-tiny", *QSHAPE_CLI, f"data.path={tmp_path / 'x.txt'}",
                             "peft.method=qlora", "peft.r=4", f"peft.target_parameters={EXPERTS}",
                             "train.device=cpu"])
    model = assemble(cfg, until="fill_adapters", with_tokenizer=False).need("model")
    storage: dict[int, int] = {}
    for p in model.parameters():
        t = p.data
        parts = [getattr(t, n) for n in quant._PARTS] if quant.is_nf4(p) else [t]
        for s in parts:
            storage[s.untyped_storage().data_ptr()] = s.untyped_storage().nbytes()
    family, mc = resolve_model_config("moe-tiny", QSHAPE)
    e, d, i, v, layers = mc.num_experts, mc.dim, mc.moe_intermediate_size, mc.vocab_size, mc.n_layers
    r = 4
    per_layer_nf4 = 4 * _nf4_bytes(d * d) + _nf4_bytes(e * 2 * i * d) + _nf4_bytes(e * d * i)
    per_layer_bf16 = 2 * (e * d + 2 * d + 2 * 64)  # router, two norms, q/k norms [head_dim]
    per_layer_lora = 4 * (4 * r * (d + d) + e * r * (d + 2 * i) + e * r * (i + d))
    expected = layers * (per_layer_nf4 + per_layer_bf16 + per_layer_lora) + 2 * (2 * v * d + d)  # embedding, head, norm
    assert sum(storage.values()) == expected
    experts = [m for m in model.modules() if isinstance(m, moe_model.Experts)]
    assert len(experts) == layers and all(quant.is_nf4(m.w13) and quant.is_nf4(m.w2) for m in experts)


def test_meta_nf4_has_the_storage_torchao_would_make() -> None:
    """On meta (the assembly's structure step) NF4 tensors are built as shells, not through
    torchao's quantisation loop: the same shapes, dtypes and block sizes."""
    mod = quant._import_nf4()
    w = torch.empty(8 * 64, 128, device="meta")
    want, got = mod.to_nf4(w.to(torch.bfloat16)), quant.to_nf4(w)
    assert type(got) is type(want) and got.shape == want.shape and got.stride() == want.stride()
    for name in (*quant._PARTS, "block_size", "scaler_block_size", "n_blocks"):
        a, b = getattr(want, name), getattr(got, name)
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device) if torch.is_tensor(a) else a == b, name
