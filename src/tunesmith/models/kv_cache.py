"""The preallocated key/value caches used by every decoder family's incremental decode:
`KVCache` (a growing filled prefix) and `StaticKVCache` (fixed shapes while decoding, for
CUDA-graph replays; see models/decode.py)."""

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


class StaticKVCache(KVCache):
    """`KVCache` with a static decode phase.

    Prefill: as `KVCache` (writes [length, length + T), returns the filled prefix).
    After `start_decode()`: `update` writes one token at slot `self.slot` ([1] long tensor)
    and returns the whole buffers [B, n_kv, max_len, hd]; `length` reads max_len - 1, so the
    model's key span (length + 1 new token) is the full buffer the key mask describes.
    """

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.decoding = False
        super().__init__(*args, **kwargs)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.k[0].device)

    @property
    def length(self) -> int:  # type: ignore[override]
        return self.max_len - 1 if self.decoding else self._length

    @length.setter
    def length(self, n: int) -> None:
        self._length = n

    def start_decode(self) -> None:
        self.decoding = True

    def advance(self, n: int) -> None:
        if not self.decoding:
            self._length += n

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.decoding:
            return super().update(layer_idx, k, v)
        ck, cv = self.k[layer_idx], self.v[layer_idx]  # [B, n_kv, max_len, hd]
        ck.index_copy_(2, self.slot, k.to(ck.dtype))  # k [B, n_kv, 1, hd]
        cv.index_copy_(2, self.slot, v.to(cv.dtype))
        return ck, cv
