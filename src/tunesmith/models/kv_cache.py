"""The preallocated key/value cache used by every decoder family's incremental decode."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.errors import TunesmithError


class KVCache:
    """Preallocated per-layer keys/values [B, n_kv, max_len, hd] plus the filled length.

    Each layer writes its new k/v at [length, length + T) via `update`; the model calls
    `advance(T)` once after all layers ran, so every layer sees the same offset.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int,
                 head_dim: int, *, device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int) -> KVCache:
        """A cache for any decoder whose config has n_layers, n_kv_heads and head_dim."""
        ref = model.tok_embeddings.weight
        c = model.cfg
        return cls(c.n_layers, batch_size, c.n_kv_heads, max_len, c.head_dim,
                   device=ref.device, dtype=ref.dtype)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, n_kv, T, hd]; return all keys/values so far [B, n_kv, length+T, hd]."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise TunesmithError(f"KV cache full: need {end} positions, allocated {self.max_len}")
        self.k[layer_idx][:, :, self.length:end] = k
        self.v[layer_idx][:, :, self.length:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0
