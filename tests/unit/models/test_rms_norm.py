"""`models.layers.rms_norm`: the eager training path (`_RMSNormLean`, which saves x and the row
rstd instead of an fp32 copy of x) gives the plain expression's output bit for bit and its
gradients, for the dtype mixes the runs use (fp32 full fine-tune under autocast, bf16 LoRA
bases, fp32 weights on bf16 activations)."""

from __future__ import annotations

import pytest
import torch

from tunesmith.models.layers import _RMSNormLean, rms_norm


def _plain(x, w, eps):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])
def test_lean_rms_norm_matches_the_plain_expression(x_dtype, w_dtype):
    g = torch.Generator().manual_seed(0)
    x0 = (3 * torch.randn(2, 5, 64, generator=g)).to(x_dtype)
    w0 = (1 + 0.1 * torch.randn(64, generator=g)).to(w_dtype)
    grad = torch.randn(2, 5, 64, generator=g).to(torch.promote_types(x_dtype, w_dtype))
    outs, grads = [], []
    for fn in (_plain, lambda x, w, eps: _RMSNormLean.apply(x, w, eps)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fn(x, w, 1e-5)
        y.backward(grad)
        outs.append(y.detach())
        grads.append((x.grad, w.grad))
    assert torch.equal(outs[0], outs[1])  # forward: the same ops in the same order
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[x_dtype]
    torch.testing.assert_close(grads[1][0], grads[0][0], **tol)
    torch.testing.assert_close(grads[1][1], grads[0][1], **tol)


def test_eager_training_takes_the_lean_path_and_saves_no_fp32_copy():
    x = torch.randn(4, 128, 256, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(256, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((str(t.dtype), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = rms_norm(x, w, 1e-5)
    assert type(y.grad_fn).__name__ == "_RMSNormLeanBackward"
    assert ("torch.float32", x.numel()) not in saved  # only x (bf16), w and rstd [4, 128, 1]
    assert sorted(saved) == sorted([("torch.bfloat16", x.numel()), ("torch.bfloat16", 256), ("torch.float32", 4 * 128)])
    with torch.no_grad():  # no graph: the plain expression, same values
        assert torch.equal(rms_norm(x, w, 1e-5), y.detach())
