"""The Triton NF4 dequantisation kernel (peft/nf4_kernel.py) equals `quant._dequant_flat`, and
so torchao's `get_original_weight`, bit for bit; run by Triton's interpreter on CPU
(tests/triton_interp.py). On the H200: benchmarks/nf4_dequant_device.py."""

from __future__ import annotations

import textwrap

import pytest
import torch

from tests.triton_interp import run_interpreted
from tunesmith.errors import TunesmithError
from tunesmith.peft import quant

CHECKS = textwrap.dedent("""
    import torch
    from tunesmith.peft import nf4_kernel, quant

    assert nf4_kernel.available()
    gen = torch.Generator().manual_seed(0)
    # one scale group (256 blocks of 64) and several, weights with a large spread and with an
    # offset (a non-zero scaler mean)
    cases = [((64, 256), 0.02, 0.0), ((128, 256), 3.0, 0.0), ((64, 512), 0.05, 0.3)]
    for shape, std, offset in cases:
        w = (torch.randn(*shape, generator=gen) * std + offset).to(torch.bfloat16)
        nf4 = quant.to_nf4(w)
        parts = quant._nf4_parts(nf4)
        got = nf4_kernel.dequant_flat(*parts[:7])
        assert got.dtype == torch.bfloat16 and got.numel() == w.numel()
        ref = quant._dequant_flat(*parts[:7])
        assert torch.equal(got, ref), (shape, (got.float() - ref.float()).abs().max())
        assert torch.equal(got.view(shape), nf4.get_original_weight()), shape
    print("ok")
""")


def test_kernel_equals_torchao_bit_for_bit_under_interpreter():
    assert run_interpreted(CHECKS).strip().endswith("ok")


def test_dequant_choice_rejects_unknown_value(monkeypatch):
    nf4 = quant.to_nf4(torch.randn(64, 256).to(torch.bfloat16))
    parts = quant._nf4_parts(nf4)
    monkeypatch.setenv("TUNESMITH_NF4", "fastest")
    with pytest.raises(TunesmithError, match="TUNESMITH_NF4='fastest'"):
        quant._use_kernel(parts[0], *parts[2:5], 64)
    monkeypatch.setenv("TUNESMITH_NF4", "kernel")
    assert not quant._use_kernel(parts[0], *parts[2:5], 64)  # CPU: quant's own paths
