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
