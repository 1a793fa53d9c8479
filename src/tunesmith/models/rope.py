"""Rotary position embeddings (HF rotate-half layout), shared by the Llama and NeoX families.

Each family computes its own inverse frequencies (Llama: llama3 scaling; NeoX: partial rotary
dims); the tables and the rotation are the same math and live here.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [B, T, hd] for positions [B, T] (per-row positions allowed)."""
    freqs = positions[..., None].float() * inv_freq.float()  # [B, T, hd/2], fp32 like HF
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: [B, T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; cos/sin [B, T, hd] broadcast over heads."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin
