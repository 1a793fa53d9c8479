"""Native BERT / RoBERTa masked-LM encoder, numerically matching HF `BertForMaskedLM` and
`RobertaForMaskedLM` (without dropout).

Submodule names (HF names in brackets):
    tok_embeddings / pos_embeddings / type_embeddings   [embeddings.word/position/token_type]
    emb_norm                                             [embeddings.LayerNorm]
    layers[i].attention.{wq,wk,wv,wo}                    [attention.self.query/key/value,
                                                          attention.output.dense]
    layers[i].attention_norm                             [attention.output.LayerNorm]
    layers[i].feed_forward.{w1,w2}                       [intermediate.dense, output.dense]
    layers[i].ffn_norm                                   [output.LayerNorm]
    head_dense / head_norm                               [MLM head transform dense/LayerNorm]
    output                                               [MLM decoder, tied, with bias]

`forward(..., return_hidden=True)` returns the MLM-head-transformed states, so that
`output(hidden)` are the logits: the trainer's fused loss (`output.weight` and `output.bias`)
then serves encoders exactly as it serves decoders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tunesmith.models.attention import (
    AttnSpec,
    PreparedAttention,
    document_positions,
    prepare_attention,
    sdpa_attention,
)
from tunesmith.models.bert.config import BertConfig
from tunesmith.models.layers import DenseMLP, activation


class EncoderAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim)
        self.wk = nn.Linear(cfg.dim, cfg.dim)
        self.wv = nn.Linear(cfg.dim, cfg.dim)
        self.wo = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, attn: PreparedAttention) -> torch.Tensor:
        b, t, d = x.shape
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        out = sdpa_attention(q, k, v, attn)  # [B, H, T, hd]
        return self.wo(out.transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    """Post-LayerNorm block: h = LN(x + attn(x)); out = LN(h + mlp(h))."""

    def __init__(self, cfg: BertConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = EncoderAttention(cfg)
        self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = DenseMLP(cfg.dim, cfg.intermediate_size, cfg.activation)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, attn: PreparedAttention) -> torch.Tensor:
        h = self.attention_norm(x + self.attention(x, attn))
        return self.ffn_norm(h + self.feed_forward(h))


class BertMLM(nn.Module):
    """BERT/RoBERTa encoder with its masked-LM head."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.dim)
        self.type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.emb_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(EncoderBlock(cfg, i) for i in range(cfg.n_layers))
        self.head_dense = nn.Linear(cfg.dim, cfg.dim)
        self.head_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=True)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> BertMLM:
        super()._apply(fn, recurse)  # may replace shared Parameters separately: re-tie
        self.tie_weights()
        return self

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """HF BERT init: N(0, 0.02) for linear and embedding weights, zero biases (incl. the
        decoder bias), LayerNorm = (1, 0); the padding row of the word embeddings is zero."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        pad = self.cfg.pad_token_id
        if pad is not None and 0 <= pad < self.cfg.vocab_size:
            self.tok_embeddings.weight[pad].zero_()

    def _positions(self, input_ids: torch.Tensor, attn: AttnSpec | None) -> torch.Tensor:
        """Default position rows [B, T] (already offset into the position table)."""
        b, t = input_ids.shape
        if attn is not None and attn.kind == "documents" and attn.doc_ids is not None:
            return document_positions(attn.doc_ids.to(input_ids.device)) + self.cfg.position_offset
        if self.cfg.model_type == "roberta":
            # HF create_position_ids_from_input_ids: real tokens count up from pad + 1, padding
            # tokens get the padding row.
            pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 1
            real = (input_ids != pad).long()  # [B, T]
            return torch.cumsum(real, dim=1) * real + pad
        return torch.arange(t, device=input_ids.device).expand(b, t)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn: AttnSpec | None = None,
        token_type_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        cache: Any = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> MLM logits [B, T, V] (or head-transformed hidden [B, T, D]).

        positions [B, T] are 0-based token positions (shifted by `position_offset` here);
        by default they follow HF. Attention is bidirectional; padding and documents specs
        restrict which keys are visible.
        """
        if cache is not None:
            raise ValueError("encoders have no KV cache")
        b, t = input_ids.shape
        rows = self._positions(input_ids, attn) if positions is None else (
            positions + self.cfg.position_offset)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = (self.tok_embeddings(input_ids) + self.type_embeddings(token_type_ids)
             + self.pos_embeddings(rows))  # [B, T, D]
        h = self.emb_norm(h)
        prepared = prepare_attention(attn, t, t, h.device, causal=False)
        for layer in self.layers:
            h = layer(h, prepared)
        h = self.head_norm(activation(self.head_dense(h), self.cfg.activation))  # [B, T, D]
        return h if return_hidden else self.output(h)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.pos_embeddings.weight.numel() + self.type_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """6 * N_matmul + 12 * L * D * T: blocks, head transform and (tied) decoder."""
        c = self.cfg
        n_matmul = (c.n_layers * c.n_matmul_params_per_layer + c.dim * c.dim
                    + c.vocab_size * c.dim)
        return 6 * n_matmul + 12 * c.n_layers * c.dim * seq_len

