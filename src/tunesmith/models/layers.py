"""Layers shared by the model families (the Llama family's gated MLP stays in its own module)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
