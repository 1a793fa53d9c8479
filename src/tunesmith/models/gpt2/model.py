"""Native GPT-2, numerically matching HF `GPT2LMHeadModel` (without dropout).

Submodule names follow the Llama family so the trainer, compile and FLOP accounting treat both
alike:

    tok_embeddings                 nn.Embedding [V, D]      (HF wte)
    pos_embeddings                 nn.Embedding [P, D]      (HF wpe, learned absolute positions)
    layers[i]
        .attention_norm / .ffn_norm  nn.LayerNorm [D]        (HF ln_1 / ln_2)
        .attention.wqkv            nn.Linear D -> 3D        (HF attn.c_attn, a Conv1D [D, 3D])
        .attention.wo              nn.Linear D -> D         (HF attn.c_proj)
        .feed_forward.w1 / .w2     nn.Linear D -> I -> D    (HF mlp.c_fc / mlp.c_proj)
    norm                           nn.LayerNorm [D]         (HF ln_f)
    output                         nn.Linear [V, D], no bias, tied to tok_embeddings
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tunesmith.models.attention import (
    AttnSpec,
    PreparedAttention,
    default_positions,
    prepare_attention,
    sdpa_attention,
)
from tunesmith.models.gpt2.config import GPT2Config
from tunesmith.models.layers import DenseMLP
from tunesmith.models.kv_cache import KVCache


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=True)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=True)

    def forward(self, x: torch.Tensor, attn: PreparedAttention, cache: KVCache | None,
                layer_idx: int) -> torch.Tensor:
        b, t, d = x.shape
        # c_attn's output is [q | k | v], each D wide with heads contiguous inside.
        q, k, v = self.wqkv(x).split(d, dim=-1)  # 3 x [B, T, D]
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # [B, H, S, hd]
        out = sdpa_attention(q, k, v, attn)  # [B, H, T, hd]
        return self.wo(out.transpose(1, 2).reshape(b, t, d))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = GPT2Attention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = DenseMLP(cfg.dim, cfg.intermediate_size, cfg.activation)

    def forward(self, x: torch.Tensor, attn: PreparedAttention,
                cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), attn, cache, self.layer_id)
        return h + self.feed_forward(self.ffn_norm(h))


class GPT2(nn.Module):
    """GPT-2 causal LM with the same forward signature as `Llama`."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.dim)
        self.layers = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> GPT2:
        # Module._apply replaces Parameters one by one (meta -> device), untying shared ones.
        super()._apply(fn, recurse)
        self.tie_weights()
        return self

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """HF GPT-2 init: N(0, 0.02) weights, N(0, 0.02 / sqrt(2 L)) residual projections
        (attention c_proj, mlp c_proj), zero biases, LayerNorm = (1, 0)."""
        std = self.cfg.initializer_range
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, 0.0, std, generator=generator)
        nn.init.normal_(self.pos_embeddings.weight, 0.0, std, generator=generator)
        for layer in self.layers:
            assert isinstance(layer, GPT2Block)
            att, ff = layer.attention, layer.feed_forward
            for lin, s in ((att.wqkv, std), (att.wo, out_std), (ff.w1, std), (ff.w2, out_std)):
                nn.init.normal_(lin.weight, 0.0, s, generator=generator)
                nn.init.zeros_(lin.bias)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.cfg.tie_word_embeddings:
            nn.init.normal_(self.output.weight, 0.0, std, generator=generator)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn: AttnSpec | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or final normed hidden [B, T, D]).

        Positions as for Llama: offset + 0..T-1, restarting per document for a documents spec.
        """
        b, t = input_ids.shape
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = default_positions(attn, b, t, offset, input_ids.device)
        h = self.tok_embeddings(input_ids) + self.pos_embeddings(positions)  # [B, T, D]
        prepared = prepare_attention(attn, t, offset + t, h.device)
        for layer in self.layers:
            h = layer(h, prepared, cache)
        if cache is not None:
            cache.advance(t)
        h = self.norm(h)
        return h if return_hidden else self.output(h)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.pos_embeddings.weight.numel()
            if not self.cfg.tie_word_embeddings:
                n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """6 * N_matmul + 12 * L * D * T (see `Llama.flops_per_token`); embeddings excluded,
        the (tied) output head counted once."""
        c = self.cfg
        n_matmul = c.n_layers * c.n_matmul_params_per_layer + c.vocab_size * c.dim
        return 6 * n_matmul + 12 * c.n_layers * c.dim * seq_len
