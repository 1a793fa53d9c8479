"""parallel.grad on plain tensors: the multi-tensor norms and clip equal the per-tensor math,
and `clip_scale` as fused AdamW's grad_scale equals clipping then stepping."""

from __future__ import annotations

import torch

from tunesmith.parallel.grad import clip_grad_norm_, clip_grads_with_norm_, clip_scale, grad_norms


def _grads(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g), torch.randn(11, generator=g),
            torch.randn(3, 4, generator=g).to(torch.bfloat16)]


def test_grad_norms_match_per_tensor_norms() -> None:
    grads = _grads()
    total, per = grad_norms(grads)
    ref = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in grads])
    torch.testing.assert_close(per, ref)
    torch.testing.assert_close(total, torch.linalg.vector_norm(ref))


def test_clip_scales_every_dtype_by_one_coefficient() -> None:
    params = [torch.nn.Parameter(t.clone()) for t in _grads()]
    for p, g in zip(params, _grads(1)):
        p.grad = g.clone()
    total = clip_grad_norm_(params, max_norm=0.5)
    coef = 0.5 / (float(total) + 1e-6)
    for p, g in zip(params, _grads(1)):
        torch.testing.assert_close(p.grad, (g.float() * coef).to(g.dtype))
    after = float(grad_norms([p.grad for p in params])[0])
    assert abs(after - 0.5) < 5e-3  # the bf16 gradient's rounding


def test_clip_scale_as_fused_adamw_grad_scale_equals_clip_then_step() -> None:
    def run(fold: bool) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(t.float().clone()) for t in _grads()]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
        for step in range(3):
            for p, g in zip(params, _grads(step + 1)):
                p.grad = g.float() * 10  # norm ~ 50: clipped to 1 every step
            total, _ = grad_norms([p.grad for p in params])
            if fold:
                opt.grad_scale = clip_scale(1.0, total)
            else:
                clip_grads_with_norm_(params, 1.0, total)
            opt.step()
            opt.__dict__.pop("grad_scale", None)
        return [p.detach() for p in params]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_clip_scale_leaves_small_gradients_alone() -> None:
    assert float(clip_scale(1.0, torch.tensor(0.25))) == 1.0
    assert abs(float(clip_scale(1.0, torch.tensor(4.0))) - 4.0) < 1e-5
