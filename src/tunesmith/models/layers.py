"""Layers shared by the model families (the Llama family's gated MLP stays in its own module)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def shared_input(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """x [..., in] through several linear layers that all read it (q/k/v; gate/up).

    The plain answer is each layer on its own. A layer type that does better when siblings
    share their input (LoRA: one low-rank matmul for all of them, so x is read once instead of
    once per layer) offers a static `forward_shared(x, layers)`; transforms install such
    layers from outside, the model only says which calls share x. `forward_shared` may
    return None to decline (then each layer runs alone).
    """
    fused = getattr(type(linears[0]), "forward_shared", None)
    if fused is not None and all(type(m) is type(linears[0]) for m in linears):
        out = fused(x, linears)
        if out is not None:
            return out
    return tuple(m(x) for m in linears)


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """HF activation names: relu, gelu (exact erf), and the tanh approximation under its names
    gelu_new / gelu_pytorch_tanh / gelu_fast (each family's config validates which it accepts)."""
    if name == "relu":
        return F.relu(x)
    return F.gelu(x, approximate="none" if name == "gelu" else "tanh")


class DenseMLP(nn.Module):
    """w2(act(w1 x)) with biases: the MLP of BERT/RoBERTa, GPT-2 and GPT-NeoX."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.activation = act
        self.w1 = nn.Linear(dim, hidden)  # [hidden, dim]
        self.w2 = nn.Linear(hidden, dim)  # [dim, hidden]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(activation(self.w1(x), self.activation))


def _normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (x / rms(x) computed in fp32 and cast back to x's dtype, rstd [..., 1] fp32)."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * rstd).to(x.dtype), rstd


class _RMSNormLean(torch.autograd.Function):
    """HF-numerics RMSNorm (normalise in fp32, cast to x's dtype, then times the weight) that
    saves x, the weight and the per-row rstd [..., 1] for backward instead of autograd's fp32
    copy of x: at long sequences that copy is the largest tensor left on the device (the final
    norm sits outside every block checkpoint; 7 GiB for [458k, 4096]). Backward recomputes the
    fp32 normalised rows from x and rstd; the cast before the weight is passed straight through,
    as autograd does for `.to()`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        normed, rstd = _normalize(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd  # [..., D] fp32, recomputed
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        g = (grad_out * weight).to(x.dtype).float()  # d loss / d normed, via the straight-through cast
        grad_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] -> weight * (x / rms(x)) with HF's numerics. Eager training on plain tensors
    uses `_RMSNormLean` (smaller saved state); compiled code, DTensors (tensor parallel) and
    no-grad calls take the plain expression, which compile fuses and DTensor shards by rule."""
    lean = (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and not torch.compiler.is_compiling() and type(x) is torch.Tensor
            and type(weight) in (torch.Tensor, nn.Parameter))
    if lean:
        return _RMSNormLean.apply(x, weight, eps)
    return weight * _normalize(x, eps)[0]
