"""Rotary position embeddings, shared by the Llama, NeoX and GPT-J families.

Two layouts of the same rotation:
    rotate-half (Llama, NeoX; HF `rotate_half`): dim i pairs with dim i + hd/2.
    interleaved (GPT-J; HF `rotate_every_two`): dims (2i, 2i+1) rotate together.
Each family computes its own inverse frequencies (Llama: llama3 scaling; NeoX, GPT-J: partial
rotary dims); the tables and the rotation live here.
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


def interleaved_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, rd] for positions [B, T] in the interleaved layout: each frequency is
    repeated for its pair of dims (HF GPT-J's `create_sinusoidal_positions` + repeat)."""
    freqs = positions[..., None].float() * inv_freq.float()  # [B, T, rd/2], fp32 like HF
    cos = freqs.cos().to(dtype).repeat_interleave(2, dim=-1)
    sin = freqs.sin().to(dtype).repeat_interleave(2, dim=-1)
    return cos, sin


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) on the last dim."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rd dims of x [B, H, T, hd] (cos/sin [B, T, rd]); the rest pass through."""
    rd = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    rot = x[..., :rd]
    rot = rot * cos + _rotate_every_two(rot) * sin
    return torch.cat((rot, x[..., rd:]), dim=-1) if rd < x.shape[-1] else rot
