"""Native Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3), numerically matching HF transformers.

Single-device code on purpose: parallelism (FSDP2, TP, activation checkpointing, compile) is
applied from outside using the stable submodule names:

    tok_embeddings                     nn.Embedding [V, D]
    layers[i]                          TransformerBlock (nn.ModuleList)
        .attention_norm / .ffn_norm    RMSNorm [D]
        .attention.{wq,wk,wv,wo}       nn.Linear  (HF q/k/v/o_proj)
        .attention.{q_norm,k_norm}     RMSNorm [hd], Qwen3 only (HF q_norm/k_norm)
        .feed_forward.{w1,w2,w3}       nn.Linear  (HF gate/down/up_proj)
    norm                               RMSNorm [D]
    output                             nn.Linear [V, D]; shares tok_embeddings.weight when tied

RoPE uses HF's rotate-half layout, so HF checkpoints load without permutation.

This module is also the shared decoder skeleton of the MoE family (`models/moe`): its model
subclasses `Llama` with sparse blocks (`make_block`, `init_block`) and reuses `Attention`,
`RMSNorm` and `FeedForward` as they are, so both families keep one attention code path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.models.attention import (
    AttnSpec,
    PreparedAttention,
    default_positions,
    prepare_attention,
    sdpa_attention,
)
from tunesmith.models.kv_cache import KVCache
from tunesmith.models.layers import rms_norm, shared_input
from tunesmith.models.llama.config import LlamaConfig
from tunesmith.models.rope import apply_rope, rope_cos_sin


# ---------------------------------------------------------------------------- RoPE
def compute_inv_freq(cfg: LlamaConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim // 2] in fp32, with llama3 scaling exactly as HF."""
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    factor = float(rs["factor"])
    low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old_ctx = float(rs["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are divided by `factor`; short ones are kept; the
    # band in between is interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


# ---------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight multiply (HF numerics)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.attention_out_bias)
        if cfg.qk_norm:  # Qwen3: one [hd] RMSNorm weight shared by all q (k) heads
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: PreparedAttention, cache: KVCache | None, layer_idx: int) -> torch.Tensor:
        b, t, _ = x.shape
        # Head counts are inferred (-1) so tensor parallelism can shard heads from outside.
        xq, xk, xv = shared_input(x, self.wq, self.wk, self.wv)
        q = xq.view(b, t, -1, self.head_dim)  # [B, T, H, hd]
        k = xk.view(b, t, -1, self.head_dim)  # [B, T, Hkv, hd]
        if hasattr(self, "q_norm"):  # per head, over hd, before RoPE (as HF Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, hd], [B, Hkv, T, hd]
        v = xv.view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # [B, Hkv, S, hd]
        out = sdpa_attention(q, k, v, attn)  # [B, H, T, hd]
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1=gate, w3=up, w2=down."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = shared_input(x, self.w1, self.w3)  # [..., intermediate] each
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_id: int, feed_forward: nn.Module | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(cfg)
        # The MoE family passes its sparse MLP (same call: [B, T, D] -> [B, T, D]).
        self.feed_forward = FeedForward(cfg) if feed_forward is None else feed_forward
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: PreparedAttention, cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, attn, cache, self.layer_id)
        return h + self.feed_forward(self.ffn_norm(h))


def init_linears(pairs: list[tuple[nn.Linear, float]], generator: torch.Generator | None) -> None:
    """N(0, std) weights and zero biases for each (linear, std)."""
    for lin, std in pairs:
        nn.init.normal_(lin.weight, 0.0, std, generator=generator)
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)


# ---------------------------------------------------------------------------- model
class Llama(nn.Module):
    """Llama-family causal LM. See the module docstring for submodule names."""

    # Set by the assembly (train.residual_dtype=bf16): under autocast the residual stream h
    # [B, T, D] is cast to this dtype after the embedding lookup, instead of staying in the fp32
    # of the embedding table. RoPE tables are made before the cast and stay fp32.
    residual_dtype: torch.dtype | None = None

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(self.make_block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # [head_dim // 2] fp32; not saved: derived from the config, recomputed after to_empty.
        self.register_buffer("inv_freq", compute_inv_freq(cfg), persistent=False)
        self.tie_weights()

    def make_block(self, cfg: LlamaConfig, layer_id: int) -> nn.Module:
        """Block `layer_id`; a subclass (the MoE family) builds its own blocks here."""
        return TransformerBlock(cfg, layer_id)

    # -- weight tying / materialisation ------------------------------------------------
    def tie_weights(self) -> None:
        """Make `output.weight` the very same Parameter as `tok_embeddings.weight` when tied."""
        if self.cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def reset_rope(self) -> None:
        """Recompute the fp32 inv_freq buffer on its current device (after to_empty / casts)."""
        self.inv_freq = compute_inv_freq(self.cfg, device=self.inv_freq.device)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Llama:
        # nn.Module._apply may replace each module's Parameter separately (e.g. meta -> cuda),
        # which silently unties shared weights, and dtype casts would round inv_freq.
        super()._apply(fn, recurse)
        self.tie_weights()
        self.reset_rope()
        return self

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Init for training from scratch: N(0, initializer_range) for embeddings and input
        projections, N(0, initializer_range / sqrt(2 * n_layers)) for the residual output
        projections (wo, w2; GPT-2 style), norms (Qwen3's q/k norms too) = 1, biases = 0, RoPE
        buffer recomputed."""
        std = self.cfg.initializer_range
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, 0.0, std, generator=generator)
        for layer in self.layers:
            self.init_block(layer, std, out_std, generator)
        self.norm.reset_parameters()
        if not self.cfg.tie_word_embeddings:
            nn.init.normal_(self.output.weight, 0.0, std, generator=generator)
        self.reset_rope()

    @staticmethod
    def init_block(layer: nn.Module, std: float, out_std: float,
                   generator: torch.Generator | None) -> None:
        """One block's init (see `init_weights`): attention, then its dense SwiGLU MLP."""
        att = layer.attention
        init_linears([(att.wq, std), (att.wk, std), (att.wv, std), (att.wo, out_std)], generator)
        layer.attention_norm.reset_parameters()
        layer.ffn_norm.reset_parameters()
        if hasattr(att, "q_norm"):  # Qwen3
            att.q_norm.reset_parameters()
            att.k_norm.reset_parameters()
        ff = layer.feed_forward
        if isinstance(ff, FeedForward):  # the MoE family's sparse layers init themselves
            init_linears([(ff.w1, std), (ff.w3, std), (ff.w2, out_std)], generator)

    # -- forward -------------------------------------------------------------------------
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

        positions [B, T] default to offset + 0..T-1 (offset = cached length), except for a
        `documents` spec where they restart at 0 in every document (packed sequences).
        `attn` defaults to plain causal attention.
        """
        b, t = input_ids.shape
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = default_positions(attn, b, t, offset, input_ids.device)
        h = self.tok_embeddings(input_ids)  # [B, T, D]
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)  # [B, T, hd] each
        if self.residual_dtype is not None and torch.is_autocast_enabled(h.device.type):
            h = h.to(self.residual_dtype)
        prepared = prepare_attention(attn, t, offset + t, h.device)
        for layer in self.layers:
            h = layer(h, cos, sin, prepared, cache)
        if cache is not None:
            cache.advance(t)
        h = self.norm(h)
        return h if return_hidden else self.output(h)

    # -- accounting ----------------------------------------------------------------------
    def num_params(self, exclude_embedding: bool = False) -> int:
        """Unique parameters (a tied matrix counts once). With exclude_embedding, the input
        embedding table is left out unless it is tied, since it then is also the output head."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and not self.cfg.tie_word_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 * N_matmul + 12 * L * H * hd * T.

        N_matmul = weights of all nn.Linear layers: the 7 per block plus the output head (V*D)
        (MoE models: the weights a token is routed through, `cfg.block_matmul_params`).
        The input embedding is a lookup, not a matmul, so it is excluded; when tied, the shared
        matrix is counted once, as the output head. Biases and norms are ignored (O(D) work).
        The second term is the attention score/value matmuls (forward + backward), counted for
        the full T x T square as is conventional (PaLM / nanoGPT / torchtitan).
        """
        c = self.cfg
        n_matmul = c.block_matmul_params + c.vocab_size * c.dim
        return 6 * n_matmul + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len
