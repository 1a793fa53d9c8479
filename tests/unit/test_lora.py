"""LoRA / DoRA / QLoRA / freezing transforms: init, what trains, what stays frozen, errors."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.peft_utils import (
    QLORA_SHAPE,
    batch,
    compile_or_skip,
    ids,
    make_trainer,
    snapshot,
    tiny_model,
    train_steps,
    watch_nf4_backward,
)
from tunesmith.checkpoint import CheckpointManager, ObjectState, OptimizerState
from tunesmith.config import PeftConfig
from tunesmith.errors import TunesmithError
from tunesmith.parallel import apply_activation_checkpointing
from tunesmith.peft import (
    LoRALinear,
    LoRASpec,
    apply_lora,
    apply_peft,
    checkpoint_model_state,
    is_peft_model,
    lora_modules,
    nf4_available,
    quant,
)
from tunesmith.runtime import Runtime, resolve_runtime

CPU32 = resolve_runtime("cpu", "fp32")


@pytest.mark.parametrize(("targets", "expected"), [
    (["q_proj", "v_proj"], {"attention.wq", "attention.wv"}),
    (["wq", "w2"], {"attention.wq", "feed_forward.w2"}),
    (["self_attn.o_proj", "mlp.up_proj"], {"attention.wo", "feed_forward.w3"}),
    ("all-linear", {"attention.wq", "attention.wk", "attention.wv", "attention.wo",
                    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"}),
    (r"model\.layers\.1\.mlp\..*", {"feed_forward.w1", "feed_forward.w2", "feed_forward.w3"}),
])
def test_targets_and_output_equal_base_at_init(targets, expected) -> None:
    model, family, cfg = tiny_model()
    x = ids()
    with torch.no_grad():
        ref = model(x)
    apply_lora(model, family.adapter(cfg), LoRASpec(r=4, alpha=8), targets)
    wrapped = set(lora_modules(model))
    blocks = [1] if isinstance(targets, str) and targets.startswith("model") else [0, 1]
    assert wrapped == {f"layers.{i}.{e}" for i in blocks for e in expected}
    assert not isinstance(model.output, LoRALinear)  # all-linear leaves the LM head alone
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # B = 0: exactly the base model


def test_init_and_scaling_follow_peft() -> None:
    model, family, cfg = tiny_model()
    apply_lora(model, family.adapter(cfg), LoRASpec(r=16, alpha=8, rslora=True), ["w1"])
    mod = model.layers[0].feed_forward.w1
    assert mod.scaling == pytest.approx(8 / math.sqrt(16))
    bound = 1 / math.sqrt(mod.in_features)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert mod.lora_A.abs().max() <= bound and mod.lora_A.std() > bound / 3
    assert torch.count_nonzero(mod.lora_B) == 0
    assert mod.lora_A.dtype == mod.lora_B.dtype == torch.float32


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_only_adapters_train_and_base_stays_bitwise(method: str) -> None:
    model, family, cfg = tiny_model()
    apply_peft(model, PeftConfig(method=method, r=4, dropout=0.1), CPU32, family, cfg)
    assert is_peft_model(model)
    before = snapshot(model)
    out = model(ids())
    out.square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and all(".lora_" in n for n in trainable)
    assert any(n.endswith("lora_magnitude") for n in trainable) == (method == "dora")
    model.zero_grad(set_to_none=True)
    losses = train_steps(make_trainer(model, weight_decay=0.1), 4, vary=False)
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        same = torch.equal(p, before[name])
        assert same != (name in trainable), name  # frozen: bitwise equal; adapters: moved


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_lora_forward_and_grads_match_the_formula(autocast: bool) -> None:
    """y = x W^T + b + s B (A x), and its gradients, for a [B, T, in] input that is not
    contiguous (the fused addmm path reshapes); fp32 exact-ish, bf16 autocast within bf16."""
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40)
    layer = LoRALinear.from_linear(base, LoRASpec(r=4, alpha=12), torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        if autocast:  # the bf16 base a mixed-precision run stores
            layer.weight.data = layer.weight.data.bfloat16()
            layer.bias.data = layer.bias.data.bfloat16()
    x = torch.randn(3, 48, 5).transpose(1, 2).requires_grad_()  # [3, 5, 48], not contiguous
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    assert y.shape == (3, 5, 40) and y.dtype == (torch.bfloat16 if autocast else torch.float32)
    g = torch.randn(3, 5, 40)
    y.float().backward(g)
    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    ref = xr @ layer.weight.float().t() + layer.bias.float() + 3.0 * (xr @ a.t()) @ b.t()
    ref.backward(g)
    for got, want in ((y.float(), ref), (x.grad, xr.grad), (layer.lora_A.grad, a.grad),
                      (layer.lora_B.grad, b.grad)):
        assert got.dtype == want.dtype == torch.float32
        # bf16 autocast: a few bf16 ulps of the tensor's scale; fp32: rounding only.
        atol = 2e-2 * want.abs().max().item() if autocast else 1e-5
        torch.testing.assert_close(got, want, atol=atol, rtol=2e-2 if autocast else 1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_shared_input_lora_equals_one_call_per_layer(monkeypatch, rslora: bool) -> None:
    """q/k/v and gate/up read the same x: their A matrices run as one matmul
    (`LoRALinear.forward_shared`). Outputs and every gradient equal the per-layer path."""
    from tunesmith.peft import lora as lora_mod

    def run(shared: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setattr(lora_mod, "SHARE_INPUT", shared)
        model, family, cfg = tiny_model()
        torch.manual_seed(0)
        apply_lora(model, family.adapter(cfg), LoRASpec(r=4, alpha=8, rslora=rslora), "all-linear")
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        out = model(ids())
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (out_a, grads_a), (out_b, grads_b) = run(True), run(False)
    # fp32; the only difference is GEMM blocking (one [3r, in] matmul vs three [r, in]).
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and any("attention.wk.lora_A" in n for n in grads_a)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-5, msg=n)


def test_freeze_layers_and_embeddings_without_lora() -> None:
    model, family, cfg = tiny_model(n_layers=3)
    pc = PeftConfig(freeze_layers=[2], num_freeze_layers=1, freeze_embeddings=True)
    apply_peft(model, pc, CPU32, family, cfg)
    assert not is_peft_model(model)
    before = snapshot(model)
    train_steps(make_trainer(model), 3)
    for name, p in model.named_parameters():
        frozen = name.startswith(("layers.0.", "layers.2.", "tok_embeddings."))
        assert torch.equal(p, before[name]) == frozen, name
    assert checkpoint_model_state(model).trainable_only


def test_lora_gives_frozen_blocks_no_adapters() -> None:
    model, family, cfg = tiny_model(n_layers=3)
    apply_peft(model, PeftConfig(method="lora", num_freeze_layers=2), CPU32, family, cfg)
    assert {n.split(".")[1] for n in lora_modules(model)} == {"2"}


def test_mixed_precision_stores_frozen_base_in_bf16() -> None:
    """bf16 autocast: frozen base in bf16 (no fp32 copy), adapters and their grads in fp32."""
    model, family, cfg = tiny_model()
    rt = Runtime(torch.device("cpu"), "bf16", torch.float32, torch.bfloat16)
    apply_peft(model, PeftConfig(method="lora", r=4), rt, family, cfg)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    with rt.autocast():
        out = model(ids())
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)


def test_activation_checkpointing_gives_identical_grads() -> None:
    def grads(ac: bool) -> dict[str, torch.Tensor]:
        model, family, cfg = tiny_model()
        torch.manual_seed(0)  # A's init
        apply_lora(model, family.adapter(cfg), LoRASpec(r=4, alpha=8, dropout=0.2), "all-linear")
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        if ac:
            assert apply_activation_checkpointing(model) == 2
        torch.manual_seed(3)  # same dropout masks; recomputation restores the RNG state
        model(ids()).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=0, atol=0, msg=n)


def test_trainable_only_checkpoint_resumes_exactly(tmp_path) -> None:
    """A LoRA checkpoint holds only adapters (+ optimizer); resuming on a freshly loaded base
    continues bitwise as if never interrupted. The tied embedding is not saved either."""
    def lora_trainer(seed: int):
        model, family, cfg = tiny_model(tie_word_embeddings=True)
        torch.manual_seed(seed)  # a different A init than the saved run: the load must win
        apply_lora(model, family.adapter(cfg), LoRASpec(r=4, alpha=8), "all-linear")
        tr = make_trainer(model)
        state = {"model": checkpoint_model_state(model), "optim": OptimizerState(model, tr.optimizer),
                 "sched": ObjectState(tr.scheduler.state_dict, tr.scheduler.load_state_dict)}
        return tr, state

    straight, _ = lora_trainer(0)
    train_steps(straight, 4)
    first, state = lora_trainer(0)
    train_steps(first, 2)
    keys = set(state["model"].state_dict())
    assert keys and all(".lora_" in k for k in keys)
    mgr = CheckpointManager(tmp_path, verify="size")
    path = mgr.save(2, state)
    second, state2 = lora_trainer(123)
    mgr.load(path, state2)
    train_steps(second, 2, start_seed=102)
    for (n, a), b in zip(straight.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), n


# ---------------------------------------------------------------------------- bad input
def test_unknown_target_lists_candidates() -> None:
    model, family, cfg = tiny_model()
    with pytest.raises(TunesmithError) as e:
        apply_lora(model, family.adapter(cfg), LoRASpec(4, 8), ["q_proj", "qkv_proj"])
    msg = str(e.value)
    assert "['qkv_proj']" in msg and "q_proj" in msg and "wq" in msg and "all-linear" in msg
    assert "\n" not in msg
    with pytest.raises(TunesmithError, match="regex 'attn.*' matches no linear layer"):
        apply_lora(model, family.adapter(cfg), LoRASpec(4, 8), "attn.*")
    with pytest.raises(TunesmithError, match="LM head"):
        apply_lora(model, family.adapter(cfg), LoRASpec(4, 8), ["lm_head"])
    assert not is_peft_model(model)  # nothing half-applied


@pytest.mark.parametrize("r", [0, -2])
def test_rank_must_be_positive(r: int) -> None:
    with pytest.raises(TunesmithError, match="rank r must be a positive integer"):
        LoRASpec(r=r, alpha=8)


def test_cli_rejects_bad_peft_config_in_one_line(tmp_path, tiny_tokenizer_dir, demo_text, capsys) -> None:
    from tests.conftest import tiny_overrides
    from tunesmith.cli.main import run

    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    base = tiny_overrides(tiny_tokenizer_dir, tmp_path / "out", demo_text[0])
    for extra, needle in ((["peft.method=lora", "peft.r=0"], "peft.r"),
                          (["peft.method=lora", "peft.target_modules=[qq_proj]"], "candidates: w1"),
                          (["peft.freeze_layers=[7]"], "out of range"),
                          # LoRA on MoE experts: a model without experts, and DoRA (config check)
                          (["peft.method=lora", "peft.target_parameters=[experts.gate_up_proj]"],
                           "Llama has no stacked expert weights"),
                          (["peft.method=dora", "peft.target_parameters=[w13]"], "needs peft.method=lora")):
        assert run(["train", str(recipe), *base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tunesmith: error:") and needle in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- QLoRA
def test_qlora_without_backend_is_one_clear_line(monkeypatch, tmp_path, tiny_tokenizer_dir, demo_text,
                                                 capsys) -> None:
    from tests.conftest import tiny_overrides
    from tunesmith.cli.main import run

    monkeypatch.setattr(quant, "_cached", None)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    with pytest.raises(TunesmithError, match=r"QLoRA needs torchao>="):
        quant.require_nf4()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    ov = tiny_overrides(tiny_tokenizer_dir, tmp_path / "out", demo_text[0])
    assert run(["train", str(recipe), *ov, "peft.method=qlora"]) == 2
    err = capsys.readouterr().err.strip()
    assert "QLoRA needs torchao" in err and "\n" not in err


@pytest.mark.skipif(not nf4_available(), reason="torchao with NF4Tensor is not installed")
def test_qlora_on_cpu_trains_adapters_on_an_nf4_base() -> None:
    model, family, cfg = tiny_model(**QLORA_SHAPE)
    dense = model.layers[0].attention.wq.weight.detach().clone()
    rt = resolve_runtime("cpu", "fp32")
    apply_peft(model, PeftConfig(method="qlora", r=8), rt, family, cfg)
    wq = model.layers[0].attention.wq
    assert isinstance(wq, LoRALinear) and wq.quantized and quant.is_nf4(wq.weight)
    assert model.output.weight.dtype == torch.bfloat16  # head and embedding: bf16, not NF4
    # NF4 of a Gaussian weight: mean abs error well under 10% of the mean magnitude.
    err = (wq.dense_weight(torch.float32) - dense).abs().mean()
    assert 0 < err < 0.1 * dense.abs().mean()
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():  # the NF4 matmul is exactly the bf16 matmul with the dequantised weight
        assert torch.equal(wq(x), x @ wq.dense_weight(torch.bfloat16).t())
    nf4_before = {n: p.detach().to(torch.float32) for n, p in model.named_parameters() if quant.is_nf4(p)}
    assert len(nf4_before) == 14
    losses = train_steps(make_trainer(model, lr=2e-2), 6, vary=False)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in nf4_before:
            assert torch.equal(p.detach().to(torch.float32), nf4_before[n]), n
    assert set(checkpoint_model_state(model).state_dict()) == {
        n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.skipif(not nf4_available(), reason="torchao with NF4Tensor is not installed")
@pytest.mark.parametrize("ac", [False, True], ids=["no-ac", "ac"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_qlora_saves_only_nf4_for_backward(monkeypatch, compiled: bool, ac: bool) -> None:
    """QLoRA under bf16 autocast: no tensor of a dense (dequantised) weight's shape and dtype is
    saved for backward -- compiled blocks used to save every one, ~2.4x the NF4 model -- and
    forward and backward each dequantise again, so at most one dense weight is alive at a time."""
    if compiled:
        compile_or_skip()
        torch._dynamo.reset()  # a fresh cache: blocks really compile, whatever ran before
    model, family, cfg = tiny_model(**QLORA_SHAPE)
    rt = Runtime(torch.device("cpu"), "bf16", torch.float32, torch.bfloat16)
    apply_peft(model, PeftConfig(method="qlora", r=4), rt, family, cfg)
    if ac:
        apply_activation_checkpointing(model)
    if compiled:
        for block in model.layers:
            block.compile()
    dense = set()
    for m in model.modules():
        if getattr(m, "quantized", False):
            o, i = m.weight.shape
            dense |= {(o, i), (i, o), (o * i,)}
    # Parameters (the bf16 head/embedding, NF4 storage) cost nothing to save: the watch leaves them out.
    watch = watch_nf4_backward(model, monkeypatch, rt, ids)
    assert watch.saved, "no saved tensors seen: the hooks did not fire"
    leaked = [(s, d) for s, d in watch.saved if s in dense and d in (torch.bfloat16, torch.float32)]
    assert not leaked, f"dense weights saved for backward: {leaked}"
    assert watch.peak == 1 and watch.live == 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    if compiled:
        torch._dynamo.reset()


def test_qlora_rejects_shapes_nf4_cannot_hold() -> None:
    if not nf4_available():
        pytest.skip("torchao with NF4Tensor is not installed")
    model, family, cfg = tiny_model()
    with pytest.raises(TunesmithError, match="NF4 needs a multiple of 16384"):
        apply_peft(model, PeftConfig(method="qlora"), CPU32, family, cfg)


def test_eval_mode_and_batches_work_with_dora_dropout() -> None:
    model, family, cfg = tiny_model()
    apply_peft(model, PeftConfig(method="dora", r=4, dropout=0.3), CPU32, family, cfg)
    model.eval()
    with torch.no_grad():
        a, b = model(batch(0)["input_ids"]), model(batch(0)["input_ids"])
    assert torch.equal(a, b)  # no dropout in eval
