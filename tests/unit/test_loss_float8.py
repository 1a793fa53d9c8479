"""The float8 LM head inside the fused loss (objective/loss_float8.py): which path runs, numerics
against the bf16 fused loss and an fp64 reference, the transform's marking, refusals and config.
`torch._scaled_mm` runs on CPU, so these are the real float8 GEMMs (slow, tiny shapes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.peft_utils import QLORA_SHAPE, batch, tiny_model
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.objective import loss_float8
from tunesmith.objective.forward import batch_loss_sum
from tunesmith.objective.loss import cross_entropy_sum, linear_cross_entropy
from tunesmith.runtime import Runtime
from tunesmith.transforms.float8 import convert_float8, float8_head_recipe


class _CountScaledMM(TorchDispatchMode):
    """Counts the float8 GEMMs (aten._scaled_mm) and plain matmuls that actually run."""

    def __init__(self) -> None:
        super().__init__()
        self.scaled = self.plain = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.scaled += name == "_scaled_mm"
        self.plain += name in ("mm", "addmm")
        return func(*args, **(kwargs or {}))


def _problem(n=100, d=64, v=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = (torch.randn(v, d, generator=g) * 0.1).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[::9] = -100
    return h, w, y


def _grads(h, w, y, **kw):
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, y, compute_dtype=torch.bfloat16, **kw)
    (out * 0.5).backward()
    return out.detach().double(), h.grad.double(), w.grad.double()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("group_bytes", [None, 96 * 64])  # one dW GEMM; groups of 64 rows
def test_float8_head_tracks_the_bf16_loss(monkeypatch, group_bytes) -> None:
    """e4m3 keeps 3 mantissa bits, e5m2 2: against fp64 on the same inputs the float8 head's
    gradients are off by ~3% (bf16: ~0.5%), its loss by ~1e-4 (errors average over D and V). A
    wrong scale, layout, pad or group offset gives errors near 100%."""
    if group_bytes:  # 100 rows -> groups of 64 and 36 (padded to 48), chunks of 32 within each
        monkeypatch.setitem(loss_float8._GROUP_BYTES, "cpu", group_bytes)
    h, w, y = _problem()
    ref = cross_entropy_sum(h.detach().double() @ w.detach().double().t(), y)
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    cross_entropy_sum(h64 @ w64.t(), y).backward(torch.tensor(0.5, dtype=torch.float64))
    bf16 = _grads(h, w, y, chunk_size=32)
    f8 = _grads(h, w, y, chunk_size=32, float8="tensorwise")
    assert abs(f8[0] - ref) / ref < 2e-3 and abs(bf16[0] - ref) / ref < 2e-3
    for got, bf, want in zip(f8[1:], bf16[1:], (h64.grad, w64.grad)):
        assert _rel(bf, want) < 0.01
        assert _rel(got, want) < 0.08 and _cos(got, want) > 0.99 and _cos(got, bf) > 0.99


def test_float8_head_runs_float8_gemms_only() -> None:
    """100 rows in chunks of 32 (4 chunks, one group): 4 logits + 4 dH GEMMs + 1 dW GEMM, all
    float8, no bf16 matmul; without gradients only the 4 logits GEMMs; the bf16 path none."""
    h, w, y = _problem()
    for float8, want in (("tensorwise", (9, 0)), (None, (0, 12))):
        with _CountScaledMM() as mode:
            linear_cross_entropy(h, w, y, compute_dtype=torch.bfloat16, chunk_size=32,
                                 float8=float8).backward()
        assert (mode.scaled, mode.plain) == want, (float8, mode.scaled, mode.plain)
    with _CountScaledMM() as mode:  # inputs that need no gradient (evaluation)
        linear_cross_entropy(h.detach(), w.detach(), y, chunk_size=32, float8="tensorwise")
    assert (mode.scaled, mode.plain) == (4, 0)


def test_float8_head_refusals() -> None:
    h, w, y = _problem()
    for recipe in ("rowwise", "rowwise_with_gw_hp"):
        with pytest.raises(TunesmithError, match="only tensorwise") as e:
            linear_cross_entropy(h, w, y, float8=recipe)
        assert "\n" not in str(e.value)
    h2, w2, y2 = _problem(d=40)  # D = 40 is no multiple of 16
    with pytest.raises(TunesmithError, match=r"head is \[96, 40\].*multiples of 16"):
        linear_cross_entropy(h2, w2, y2, float8="tensorwise")


def _rt() -> Runtime:
    return Runtime(torch.device("cpu"), "fp32", torch.float32, None)


def test_float8_transform_marks_the_head_for_the_fused_loss() -> None:
    """float8_skip=[]: the head stays an nn.Linear (its forward never runs) and is marked; the
    model's loss then runs its head in float8, tied embedding and all, close to the bf16 head."""
    model, _, _ = tiny_model(**F8_SHAPE)
    ref, _, _ = tiny_model(**F8_SHAPE)
    names = convert_float8(model, "tensorwise", "all", skip=[], emulate=True)
    convert_float8(ref, "tensorwise", "all", emulate=True)
    assert "output" in names and type(model.output) is nn.Linear
    assert float8_head_recipe(model.output) == "tensorwise" and float8_head_recipe(ref.output) is None
    b = batch(0)
    counts = []
    for m in (model, ref):
        with _CountScaledMM() as mode:
            loss = batch_loss_sum(m, b, _rt())
            loss.backward()
        counts.append(mode.scaled)
    assert counts[0] >= 3 and counts[1] == 0  # torchao's emulate mode runs no _scaled_mm
    with torch.no_grad():
        l8, l16 = (batch_loss_sum(m, b, _rt(), need_grad=False) for m in (model, ref))
    assert abs(float(l8 - l16)) / float(l16) < 0.02
    head8, head16 = model.output.weight.grad, ref.output.weight.grad
    assert _cos(head8.double(), head16.double()) > 0.99


F8_SHAPE = QLORA_SHAPE  # dim 128, vocab 128: every width a multiple of 16; tied embeddings


def test_float8_head_refused_for_other_recipes_and_a_bias() -> None:
    model, _, _ = tiny_model(**F8_SHAPE)
    with pytest.raises(TunesmithError, match="only with tensorwise"):
        convert_float8(model, "rowwise", "all", skip=[], emulate=True)
    model, _, _ = tiny_model(**F8_SHAPE)
    model.output = nn.Linear(128, 128, bias=True)
    with pytest.raises(TunesmithError, match="has a bias"):
        convert_float8(model, "tensorwise", "all", skip=[], emulate=True)


def test_float8_head_config() -> None:
    cfg = load_config(None, ["data.path=x", "train.float8=tensorwise", "train.float8_skip=[]"])
    assert cfg.train.float8_skip == []
    for recipe in ("rowwise", "rowwise_with_gw_hp"):
        with pytest.raises(Exception, match="only with tensorwise; keep 'output'"):
            load_config(None, ["data.path=x", f"train.float8={recipe}", "train.float8_skip=[]"])
    assert load_config(None, ["data.path=x", "train.float8=rowwise"]).train.float8_skip == ["output"]
