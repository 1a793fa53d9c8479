"""Native Gemma 3 text decoder (HF `Gemma3ForCausalLM`), numerically matching transformers.

Single-device code; parallelism, AC, compile and adapters are applied from outside using the
same submodule names as the Llama family wherever the roles agree:

    tok_embeddings                        nn.Embedding [V, D]; its output is scaled by sqrt(D)
    layers[i]                             GemmaBlock (nn.ModuleList)
        .attention_norm                   GemmaRMSNorm [D]  (HF input_layernorm)
        .post_attention_norm              GemmaRMSNorm [D]  (HF post_attention_layernorm)
        .ffn_norm                         GemmaRMSNorm [D]  (HF pre_feedforward_layernorm)
        .post_ffn_norm                    GemmaRMSNorm [D]  (HF post_feedforward_layernorm)
        .attention.{wq,wk,wv,wo}          nn.Linear        (HF q/k/v/o_proj)
        .attention.{q_norm,k_norm}        GemmaRMSNorm [hd] (HF q_norm/k_norm)
        .feed_forward.{w1,w2,w3}          nn.Linear        (HF gate/down/up_proj), GeGLU
    norm                                  GemmaRMSNorm [D]
    output                                nn.Linear [V, D]; shares tok_embeddings.weight when tied

Per layer, `sliding` says whether it attends within `sliding_window` keys (local RoPE base) or
to the whole causal prefix (global RoPE base, optional linear scaling). The mask for each kind
is prepared once per forward (`models.attention.prepare_attention(..., window=)`).
The embedding's padding row is not frozen (HF's `padding_idx`), as in the Llama family.
"""

from __future__ import annotations

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
from tunesmith.models.gemma.config import SLIDING, GemmaConfig
from tunesmith.models.kv_cache import KVCache
from tunesmith.models.layers import shared_input
from tunesmith.models.llama.model import Llama
from tunesmith.models.rope import apply_rope, rope_cos_sin


def compute_inv_freq(theta: float, head_dim: int, factor: float = 1.0,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim // 2] in fp32 as HF; linear scaling divides them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    return inv_freq / factor if factor != 1.0 else inv_freq


def embed_scale(dim: int, dtype: torch.dtype) -> float:
    """sqrt(D) rounded as HF rounds it: an fp32 tensor cast to the embedding's dtype (55.4256
    becomes 55.5 in bf16 for D=3072); returned as a float so no device tensor is made."""
    return float(torch.tensor(dim ** 0.5).to(dtype))


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), all in fp32, cast back to x's dtype after the multiply
    (Llama casts before it). The weight starts at 0: the norm starts as the identity scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


class Attention(nn.Module):
    """GQA attention with per-head q/k RMSNorm before RoPE and scores scaled by
    query_pre_attn_scalar ** -0.5 (not head_dim ** -0.5)."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        bias = cfg.attention_bias
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=bias)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: PreparedAttention, cache: KVCache | None, layer_idx: int) -> torch.Tensor:
        b, t, _ = x.shape
        # Head counts are inferred (-1) so tensor parallelism can shard heads from outside.
        xq, xk, xv = shared_input(x, self.wq, self.wk, self.wv)
        q = self.q_norm(xq.view(b, t, -1, self.head_dim)).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_norm(xk.view(b, t, -1, self.head_dim)).transpose(1, 2)  # [B, Hkv, T, hd]
        v = xv.view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # [B, Hkv, S, hd]
        out = sdpa_attention(q, k, v, attn, scale=self.scale)  # [B, H, T, hd]
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """GeGLU: w2(gelu_tanh(w1 x) * w3 x); w1=gate, w3=up, w2=down."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = shared_input(x, self.w1, self.w3)  # [..., intermediate] each
        return self.w2(F.gelu(gate, approximate="tanh") * up)


class GemmaBlock(nn.Module):
    """Pre- and post-norm around both sublayers: h = x + post(attn(pre(x)))."""

    def __init__(self, cfg: GemmaConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.sliding = cfg.types[layer_id] == SLIDING
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)
        self.post_ffn_norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: PreparedAttention, cache: KVCache | None = None) -> torch.Tensor:
        a = self.attention(self.attention_norm(x), cos, sin, attn, cache, self.layer_id)
        h = x + self.post_attention_norm(a)
        return h + self.post_ffn_norm(self.feed_forward(self.ffn_norm(h)))


class Gemma(nn.Module):
    """Gemma 3 causal LM (text). See the module docstring for submodule names."""

    # Set by the assembly (train.residual_dtype=bf16): under autocast the residual stream is
    # cast to this dtype after the (scaled) embedding; RoPE tables stay fp32 until then.
    residual_dtype: torch.dtype | None = None

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(GemmaBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # [head_dim // 2] fp32 each; not saved: derived from the config, recomputed after to_empty.
        self.register_buffer("inv_freq", self._inv_freq(False), persistent=False)
        self.register_buffer("inv_freq_local", self._inv_freq(True), persistent=False)
        self.tie_weights()

    def _inv_freq(self, local: bool, device: torch.device | str | None = None) -> torch.Tensor:
        c = self.cfg
        if local:
            return compute_inv_freq(c.rope_local_base_freq, c.head_dim, device=device)
        return compute_inv_freq(c.rope_theta, c.head_dim, c.rope_scaling_factor, device=device)

    # The same definitions as Llama's (one matrix shared when tied; 7 linear layers per block;
    # a tied head counted once), shared rather than copied. flops_per_token counts the full
    # T x T attention square in every layer, sliding ones included (a sliding layer does about
    # min(T, window) / T of that work), so MFU is conventional, not tight, when T > window.
    tie_weights = Llama.tie_weights
    num_params = Llama.num_params
    flops_per_token = Llama.flops_per_token

    # -- materialisation ---------------------------------------------------------------
    def reset_rope(self) -> None:
        """Recompute the fp32 inv_freq buffers on their current device (after to_empty / casts)."""
        self.inv_freq = self._inv_freq(False, self.inv_freq.device)
        self.inv_freq_local = self._inv_freq(True, self.inv_freq.device)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Gemma:
        # As Llama: _apply may replace parameters one by one (untying them) and casts would
        # round the RoPE buffers.
        super()._apply(fn, recurse)
        self.tie_weights()
        self.reset_rope()
        return self

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Init for training from scratch as HF's `_init_weights`: N(0, initializer_range) for
        the embedding and every linear layer, biases 0, every RMSNorm weight 0 (a scale of 1)."""
        std = self.cfg.initializer_range
        nn.init.normal_(self.tok_embeddings.weight, 0.0, std, generator=generator)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.output:
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, GemmaRMSNorm):
                module.reset_parameters()
        if not self.cfg.tie_word_embeddings:
            nn.init.normal_(self.output.weight, 0.0, std, generator=generator)
        self.reset_rope()

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

        positions [B, T] default to offset + 0..T-1 (offset = cached length), restarting per
        document for a `documents` spec. `attn` (default: causal) applies to every layer; the
        sliding layers add their window to it.
        """
        b, t = input_ids.shape
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = default_positions(attn, b, t, offset, input_ids.device)
        h = self.tok_embeddings(input_ids)  # [B, T, D]
        h = h * embed_scale(self.cfg.dim, h.dtype)
        kinds = {layer.sliding for layer in self.layers}  # type: ignore[union-attr]
        # Per kind (True = sliding): RoPE tables [B, T, hd] and the prepared mask.
        rope = {s: rope_cos_sin(self.inv_freq_local if s else self.inv_freq, positions, h.dtype)
                for s in kinds}
        if self.residual_dtype is not None and torch.is_autocast_enabled(h.device.type):
            h = h.to(self.residual_dtype)
        window = self.cfg.sliding_window
        prepared = {s: prepare_attention(attn, t, offset + t, h.device, window=window if s else None)
                    for s in kinds}
        for layer in self.layers:
            s = layer.sliding
            h = layer(h, *rope[s], prepared[s], cache)
        if cache is not None:
            cache.advance(t)
        h = self.norm(h)
        return h if return_hidden else self.output(h)
