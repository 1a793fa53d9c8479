"""GPU checks that CPU CI cannot run: compiled fused CE vs eager reference, tiny e2e training.

    PYTHONPATH=src python benchmarks/check_cuda.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunesmith.train.loss import cross_entropy_sum, linear_cross_entropy  # noqa: E402


def check_fused_ce(dtype: torch.dtype, n=5000, d=256, v=32000, tol=1e-4) -> float:
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, d, device="cuda", generator=g, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[::7] = -100
    ref = cross_entropy_sum(h.double() @ w.double().t(), y)
    ref.backward()
    gh, gw = h.grad.double().clone(), w.grad.double().clone()
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, y, compute_dtype=dtype, chunk_size=2048)
    out.backward()
    errs = [
        abs(out.item() - ref.item()) / abs(ref.item()),
        ((h.grad.double() - gh).norm() / gh.norm()).item(),
        ((w.grad.double() - gw).norm() / gw.norm()).item(),
    ]
    print(f"fused CE {dtype}: rel err loss {errs[0]:.2e}, dh {errs[1]:.2e}, dW {errs[2]:.2e}")
    assert max(errs) < tol, errs
    return max(errs)


if __name__ == "__main__":
    check_fused_ce(torch.float32, tol=1e-5)
    check_fused_ce(torch.bfloat16, tol=1e-2)
    print("cuda checks passed")
