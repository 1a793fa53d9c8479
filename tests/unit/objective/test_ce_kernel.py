"""The Triton cross-entropy rows kernel (objective/ce_kernel.py) against the reference
expression of the fused loss (`_chunk_loss_and_grad`), run by Triton's interpreter on CPU.

The checks run in a subprocess under TRITON_INTERPRET=1 (tests/triton_interp.py). The same
kernel runs compiled on the H200 (benchmarks/ce_kernel_device.py)."""

from __future__ import annotations

import textwrap

import pytest

from tests.triton_interp import run_interpreted
from tunesmith.errors import TunesmithError
from tunesmith.objective import loss

CHECKS = textwrap.dedent("""
    import torch
    from tunesmith.objective import ce_kernel
    from tunesmith.objective.loss import _chunk_loss, _chunk_loss_and_grad

    assert ce_kernel.available()
    gen = torch.Generator().manual_seed(0)
    # vocab below and across the kernel's 8192-column block (a full and a partial one); rows
    # with ignored targets, targets at both ends of the vocab, a grad scale, fp32 and bf16.
    # G within [-0.25, 0.25]: fp32 to its summation-order rounding, bf16 to one rounding
    for dtype, rtol, atol in ((torch.float32, 1e-5, 1e-7), (torch.bfloat16, 0, 0.25 * 2 ** -8)):
        for vocab in (96, 8193):
            x = (torch.randn(6, vocab, generator=gen) * 4).to(dtype)
            y = torch.randint(0, vocab, (6,), generator=gen)
            y[1], y[3], y[4] = -100, 0, vocab - 1
            ref_loss, ref_g = _chunk_loss_and_grad(x.clone(), y, dtype, 0.25)
            block = x.clone()
            got_loss, got_g = ce_kernel.chunk_loss_and_grad(block, y, 0.25)
            assert got_g.data_ptr() == block.data_ptr(), "G is written over the block"
            assert got_g.dtype == dtype
            torch.testing.assert_close(got_loss, ref_loss.float(), rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(got_g.float(), ref_g.float(), rtol=rtol, atol=atol)
            assert (got_g[1] == 0).all(), "ignored row has zero gradient"
            loss_only = ce_kernel.chunk_loss(x, y)
            torch.testing.assert_close(loss_only, _chunk_loss(x, y).float(), rtol=1e-6, atol=1e-5)
    # every row ignored: zero loss and gradient
    x = torch.randn(3, 50, generator=gen)
    y = torch.full((3,), -100)
    l, g = ce_kernel.chunk_loss_and_grad(x, y)
    assert float(l) == 0.0 and (g == 0).all()
    # a column slice (row stride 300): G goes over the slice only, the other columns stay
    wide = torch.randn(4, 300, generator=gen)
    y = torch.randint(0, 150, (4,), generator=gen)
    ref = _chunk_loss_and_grad(wide[:, :150].clone(), y, torch.float32)[1]
    rest = wide[:, 150:].clone()
    l, g = ce_kernel.chunk_loss_and_grad(wide[:, :150], y)
    assert torch.equal(wide[:, 150:], rest)
    torch.testing.assert_close(wide[:, :150], ref, rtol=1e-5, atol=1e-7)
    # a transposed block (column stride != 1) is copied first; the input is left as it was
    tall = torch.randn(150, 4, generator=gen)
    before = tall.clone()
    l, g = ce_kernel.chunk_loss_and_grad(tall.t(), y)
    assert torch.equal(tall, before)
    torch.testing.assert_close(g, ref.new_tensor(_chunk_loss_and_grad(tall.t(), y, torch.float32)[1]),
                               rtol=1e-5, atol=1e-7)
    # the fused loss's dispatcher: the kernel when G has the block's dtype, else the fallback
    from tunesmith.objective.loss import _triton_grad
    x = torch.randn(5, 300, generator=gen).to(torch.bfloat16)
    y = torch.randint(0, 300, (5,), generator=gen)
    got_l, got_g = _triton_grad(x.clone(), y, torch.bfloat16, 0.5)
    want_l, want_g = ce_kernel.chunk_loss_and_grad(x.clone(), y, 0.5)
    assert torch.equal(got_g, want_g) and torch.equal(got_l, want_l)
    got_l, got_g = _triton_grad(x.clone(), y, torch.float32, 0.5)
    ref_l, ref_g = _chunk_loss_and_grad(x.clone(), y, torch.float32, 0.5)
    assert got_g.dtype == torch.float32
    torch.testing.assert_close(got_g, ref_g, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_l, ref_l, rtol=1e-6, atol=1e-5)
    print("ok")
""")


def test_kernel_equals_reference_under_interpreter():
    assert run_interpreted(CHECKS).strip().endswith("ok")


def test_kernel_choice(monkeypatch):
    monkeypatch.setenv("TUNESMITH_CE", "inductor")
    assert loss.ce_kernel_choice() == "inductor"
    monkeypatch.setenv("TUNESMITH_CE", "cuda-magic")
    with pytest.raises(TunesmithError, match="TUNESMITH_CE='cuda-magic'"):
        loss.ce_kernel_choice()
    monkeypatch.delenv("TUNESMITH_CE")
    expected = "triton" if loss.ce_kernel.available() else "inductor"
    assert loss.ce_kernel_choice() == expected
