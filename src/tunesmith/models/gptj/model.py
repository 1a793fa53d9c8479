"""Native GPT-J decoder, numerically matching HF `GPTJForCausalLM`.

Single-device code; parallelism, adapters and compile are applied from outside using these
submodule names:

    tok_embeddings                       nn.Embedding [V, D]            (HF transformer.wte)
    layers[i]                            GPTJBlock                      (HF transformer.h.i)
        .attention_norm                  LayerNorm [D], read by both branches (HF ln_1)
        .attention.{wq,wk,wv,wo}         nn.Linear, no bias             (HF attn.{q,k,v,out}_proj)
        .feed_forward.{w1,w2}            nn.Linear with bias            (HF mlp.fc_in / fc_out)
    norm                                 LayerNorm [D]                  (HF transformer.ln_f)
    output                               nn.Linear [V, D] with bias     (HF lm_head)

Rotary embeddings use GPT-J's interleaved layout on the first `rotary_dim` dims of each head:
dims (2i, 2i+1) rotate together by angle pos * 10000^(-2i / rotary_dim). Weights load as HF
stores them, with no permutation, so LoRA adapters keep peft's row order too.
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
from tunesmith.models.gptj.config import GPTJConfig
from tunesmith.models.layers import DenseMLP, shared_input
from tunesmith.models.kv_cache import KVCache
from tunesmith.models.rope import apply_interleaved_rope, interleaved_cos_sin

ROPE_BASE = 10000.0  # fixed in GPT-J (not a config key)


def gptj_inv_freq(cfg: GPTJConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies [rope_dims // 2] in fp32, as HF's `create_sinusoidal_positions`."""
    rd = cfg.rope_dims
    exps = torch.arange(0, rd, 2, dtype=torch.int64, device=device).to(torch.float32) / rd
    return 1.0 / (ROPE_BASE ** exps)


class GPTJAttention(nn.Module):
    def __init__(self, cfg: GPTJConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: PreparedAttention, cache: KVCache | None, layer_idx: int) -> torch.Tensor:
        b, t, _ = x.shape
        # Head counts are inferred (-1) so tensor parallelism can shard heads from outside.
        xq, xk, xv = shared_input(x, self.wq, self.wk, self.wv)
        q = xq.view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = xk.view(b, t, -1, self.head_dim).transpose(1, 2)
        v = xv.view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # [B, H, S, hd]
        out = sdpa_attention(q, k, v, attn)  # [B, H, T, hd]
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class GPTJBlock(nn.Module):
    """x + attn(ln x) + mlp(ln x): one LayerNorm, both branches in parallel."""

    def __init__(self, cfg: GPTJConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = GPTJAttention(cfg)
        self.feed_forward = DenseMLP(cfg.dim, cfg.intermediate_size, cfg.activation)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: PreparedAttention, cache: KVCache | None = None) -> torch.Tensor:
        h = self.attention_norm(x)  # [B, T, D]
        return x + self.attention(h, cos, sin, attn, cache, self.layer_id) + self.feed_forward(h)


class GPTJ(nn.Module):
    def __init__(self, cfg: GPTJConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(GPTJBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=True)
        # [rope_dims // 2] fp32, derived from the config: not saved, recomputed after moves.
        self.register_buffer("inv_freq", gptj_inv_freq(cfg), persistent=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> GPTJ:
        super()._apply(fn, recurse)  # re-tie, and keep inv_freq exact fp32 after casts
        self.tie_weights()
        self.inv_freq = gptj_inv_freq(self.cfg, device=self.inv_freq.device)
        return self

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """HF GPT-J init: N(0, initializer_range) weights, zero biases, LayerNorm = (1, 0);
        the residual outputs (wo, w2) scaled by 1/sqrt(2 L) as in GPT-2 style pre-training."""
        std = self.cfg.initializer_range
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                s = out_std if name.endswith(("attention.wo", "feed_forward.w2")) else std
                nn.init.normal_(module.weight, 0.0, s, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        self.tie_weights()
        self.inv_freq = gptj_inv_freq(self.cfg, device=self.inv_freq.device)

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                attn: AttnSpec | None = None, cache: KVCache | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or final normed hidden [B, T, D])."""
        b, t = input_ids.shape
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = default_positions(attn, b, t, offset, input_ids.device)
        h = self.tok_embeddings(input_ids)  # [B, T, D]
        cos, sin = interleaved_cos_sin(self.inv_freq, positions, h.dtype)  # [B, T, rd]
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
