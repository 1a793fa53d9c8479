"""Schedules, optimizer groups, and the fused chunked cross-entropy against the reference."""

import math
import subprocess
import sys

import pytest
import torch

from tunesmith.config.schema import ScheduleConfig
from tunesmith.objective import loss as loss_mod
from tunesmith.objective.loss import chunk_rows, cross_entropy_sum, linear_cross_entropy
from tunesmith.optim import lr_factor, param_groups


def test_warmup_then_cosine_to_floor():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg, 110, 50) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert f[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_linear_constant_and_step_decay():
    lin = ScheduleConfig(name="linear", warmup_ratio=0.1)
    assert lr_factor(0, lin, 100, 10) == pytest.approx(0.1)
    assert lr_factor(55, lin, 100, 10) == pytest.approx(0.5)
    assert lr_factor(37, ScheduleConfig(name="constant"), 100, 10) == 1.0
    step = ScheduleConfig(name="step", gamma=0.5)
    assert [lr_factor(s, step, 40, 10) for s in (0, 9, 10, 25, 39)] == [1, 1, 0.5, 0.25, 0.125]


def test_param_groups_skip_frozen_and_no_decay_for_vectors():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    m[2].weight.requires_grad_(False)
    groups = param_groups(m, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    assert decay == {id(m[0].weight)}
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 4


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_linear_cross_entropy_matches_reference(chunk):
    g = torch.Generator().manual_seed(0)
    n, d, v = 45, 12, 33
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    y[[0, 5, 44]] = -100
    ref = cross_entropy_sum((h @ w.t()), y)
    ref.backward(torch.tensor(0.25, dtype=torch.float64))
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, y, chunk_size=chunk)
    (out * 0.25).backward()
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h.grad, gh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, gw, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk", [5, 64])
def test_linear_cross_entropy_bf16_compute_matches_reference(chunk):
    """fp32 weights, bf16 matmuls (mixed precision): the "cast" dW accumulation CPU uses. The
    reference is fp64 on the same bf16-rounded inputs, so what differs is bf16 rounding of the
    logits / chunk products only; dW sums chunks in fp32 starting from the first chunk's
    product (no zero fill), so a wrong first chunk or a missed one shows here."""
    g = torch.Generator().manual_seed(1)
    n, d, v = 37, 16, 40
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = (torch.randn(v, d, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[[3, 36]] = -100
    h64, w64 = (t.detach().bfloat16().double().requires_grad_() for t in (h, w))
    ref = cross_entropy_sum(h64 @ w64.t(), y)
    ref.backward(torch.tensor(0.5, dtype=torch.float64))
    out = linear_cross_entropy(h, w, y, compute_dtype=torch.bfloat16, chunk_size=chunk)
    (out * 0.5).backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=0)
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-2


def test_weight_grad_accumulation_modes_agree():
    """Each CPU-runnable dW mode: the first chunk overwrites the (unfilled) buffer, later ones
    add. CUDA's "addmm"/"mm" modes are checked against "cast" by benchmarks/check_f8head.py."""
    g = torch.Generator().manual_seed(2)
    gs = [torch.randn(8, 24, generator=g) for _ in range(3)]  # [c, V] per chunk
    hs = [torch.randn(8, 16, generator=g) for _ in range(3)]  # [c, D]
    ref = sum(a.double().t() @ b.double() for a, b in zip(gs, hs))
    cpu = torch.device("cpu")
    for dtype, mode in ((torch.float32, "same"), (torch.bfloat16, "cast")):
        buf = torch.full((24, 16), float("nan"))  # what an unfilled buffer may hold
        assert loss_mod._grad_w_mode(cpu, dtype, buf) == mode
        for i, (a, b) in enumerate(zip(gs, hs)):
            loss_mod._add_weight_grad(buf, a.to(dtype), b.to(dtype), mode, first=i == 0)
        torch.testing.assert_close(buf.double(), ref, rtol=3e-2 if mode == "cast" else 1e-5, atol=5e-2)
    # The probe falls back to "cast" where the out_dtype GEMMs do not run (no CPU kernel).
    assert loss_mod._probe_out_dtype(cpu, torch.bfloat16, torch.float32) == "cast"


def test_linear_cross_entropy_no_grad_and_all_ignored():
    h, w = torch.randn(6, 4), torch.randn(9, 4)
    y = torch.full((6,), -100)
    with torch.no_grad():
        assert linear_cross_entropy(h, w, y).item() == 0.0
    y[2] = 3
    expect = torch.logsumexp(h[2] @ w.t(), 0) - (h[2] @ w[3])
    assert math.isclose(linear_cross_entropy(h, w, y).item(), expect.item(), rel_tol=1e-5)
    # No rows at all: the (otherwise unfilled) dW buffer is zero.
    w.requires_grad_()
    linear_cross_entropy(torch.empty(0, 4), w, torch.empty(0, dtype=torch.long)).backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_linear_cross_entropy_under_no_grad_computes_no_gradients(monkeypatch):
    """Inputs that require grad under torch.no_grad (evaluation with a trainable model): no graph
    is recorded, so the forward must not build the [N, D] / [V, D] gradients it would throw away."""
    seen = []
    real = loss_mod._accumulate_chunks

    def spy(hidden, w, labels, chunk_size, grad_h, grad_w):
        seen.append((grad_h is None, grad_w is None))
        return real(hidden, w, labels, chunk_size, grad_h, grad_w)

    monkeypatch.setattr(loss_mod, "_accumulate_chunks", spy)
    h, w = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    y = torch.tensor([1, 2, 3, -100, 4, 5])
    with torch.no_grad():
        inference = linear_cross_entropy(h, w, y)
    training = linear_cross_entropy(h, w, y)
    assert seen == [(True, True), (False, False)]
    assert torch.equal(inference, training.detach())


def test_a_second_backward_through_the_loss_is_refused():
    """Backward scales the gradients made in forward in place (no second [V, D] buffer), so a
    retained graph cannot be backpropagated twice: refused in one line instead of wrong."""
    from tunesmith.errors import TunesmithError

    h, w = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.tensor([1, 2, 3, 0, 4, 5]))
    loss.backward(retain_graph=True)
    with pytest.raises(TunesmithError, match="backward runs once"):
        loss.backward()


def test_chunk_rows_follow_the_block_memory():
    """Rows per chunk come from what a [rows, V] fp32 block costs: 64 MiB off CUDA."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert chunk_rows(128256, cpu) == (64 << 20) // (4 * 128256) == 130
    assert chunk_rows(32000, cpu) == 524 and chunk_rows(50257, cpu) == 333
    assert chunk_rows(128256, cuda) == 4096  # the setting the GPU throughput was measured with
    assert chunk_rows(10**7, cpu) == 64 and chunk_rows(8, cpu) == 4096  # clamped both ways


_PEAK_SCRIPT = """
import resource, torch
from tunesmith.objective.loss import linear_cross_entropy
torch.set_num_threads(1)
n, d, v = 512, 16, 131072
g = torch.Generator().manual_seed(0)
h = (torch.randn(n, d, generator=g) * 0.5).requires_grad_()
w = (torch.randn(v, d, generator=g) * 0.05).requires_grad_()
y = torch.randint(0, v, (n,), generator=g)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
linear_cross_entropy(h, w, y).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_cpu_loss_peak_memory_stays_far_below_the_logits():
    """512 tokens x 131,072 vocab: the logits alone are 256 MiB (plain CE also keeps their
    gradient). The fused CPU path holds one 64 MiB block at a time plus W's gradient (8 MiB):
    its peak must grow by under half the logits (measured 81 MiB; 145 MiB when the previous
    chunk's block was still alive while the next one was allocated)."""
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True,
                         timeout=300, check=True)
    grew = int(out.stdout.strip().splitlines()[-1])
    logits = 512 * 131072 * 4
    assert grew < logits // 2, f"peak grew {grew / 2**20:.0f} MiB"
