"""Native GPT-NeoX (Pythia), numerically matching HF `GPTNeoXForCausalLM` (without dropout).

Submodule names follow the other families (HF names in brackets):
    tok_embeddings                     [gpt_neox.embed_in]
    layers[i].attention_norm/ffn_norm  [input_layernorm / post_attention_layernorm]
    layers[i].attention.wqkv           [attention.query_key_value]: output laid out per head as
                                        [H, 3 * hd] = (q | k | v) of each head, kept as in HF
    layers[i].attention.wo             [attention.dense]
    layers[i].feed_forward.w1/w2       [mlp.dense_h_to_4h / dense_4h_to_h]
    norm                               [gpt_neox.final_layer_norm]
    output                             [embed_out]
"""

from __future__ import annotations

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
from tunesmith.models.kv_cache import KVCache
from tunesmith.models.rope import apply_rope, rope_cos_sin
from tunesmith.models.neox.config import NeoXConfig
from tunesmith.models.layers import DenseMLP


def neox_inv_freq(cfg: NeoXConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2] (fp32) over the rotary part of a head."""
    rd = cfg.rotary_dim
    exps = torch.arange(0, rd, 2, dtype=torch.int64, device=device).to(torch.float32) / rd
    return 1.0 / (cfg.rope_theta ** exps)


class NeoXAttention(nn.Module):
    def __init__(self, cfg: NeoXConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rotary_dim = cfg.rotary_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=cfg.attention_bias)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate only the first rotary_dim dims of each head: x [B, H, T, hd]."""
        rd = self.rotary_dim
        return torch.cat((apply_rope(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: PreparedAttention, cache: KVCache | None, layer_idx: int) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.wqkv(x).view(b, t, -1, 3 * self.head_dim).transpose(1, 2)  # [B, H, T, 3hd]
        q, k, v = qkv.chunk(3, dim=-1)  # each [B, H, T, hd]
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # [B, H, S, hd]
        out = sdpa_attention(q, k, v, attn)  # [B, H, T, hd]
        return self.wo(out.transpose(1, 2).reshape(b, t, d))


class NeoXBlock(nn.Module):
    def __init__(self, cfg: NeoXConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.parallel = cfg.use_parallel_residual
        self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = NeoXAttention(cfg)
        self.feed_forward = DenseMLP(cfg.dim, cfg.intermediate_size, cfg.activation)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: PreparedAttention, cache: KVCache | None = None) -> torch.Tensor:
        a = self.attention(self.attention_norm(x), cos, sin, attn, cache, self.layer_id)
        if self.parallel:  # both branches read the block input
            return x + a + self.feed_forward(self.ffn_norm(x))
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h))


class NeoX(nn.Module):
    def __init__(self, cfg: NeoXConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(NeoXBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # [rotary_dim // 2] fp32, derived from the config: not saved, recomputed after moves.
        self.register_buffer("inv_freq", neox_inv_freq(cfg), persistent=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> NeoX:
        super()._apply(fn, recurse)  # re-tie, and keep inv_freq exact fp32 after casts
        self.tie_weights()
        self.inv_freq = neox_inv_freq(self.cfg, device=self.inv_freq.device)
        return self

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """HF GPT-NeoX init: N(0, 0.02) weights, zero biases, LayerNorm = (1, 0)."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        self.tie_weights()
        self.inv_freq = neox_inv_freq(self.cfg, device=self.inv_freq.device)

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                attn: AttnSpec | None = None, cache: KVCache | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or final normed hidden [B, T, D])."""
        b, t = input_ids.shape
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = default_positions(attn, b, t, offset, input_ids.device)
        h = self.tok_embeddings(input_ids)  # [B, T, D]
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)  # [B, T, rotary_dim]
        prepared = prepare_attention(attn, t, offset + t, h.device)
        for layer in self.layers:
            h = layer(h, cos, sin, prepared, cache)
        if cache is not None:
            cache.advance(t)
        h = self.norm(h)
        return h if return_hidden else self.output(h)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and not self.cfg.tie_word_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        c = self.cfg
        n_matmul = c.n_layers * c.n_matmul_params_per_layer + c.vocab_size * c.dim
        return 6 * n_matmul + 12 * c.n_layers * c.dim * seq_len
