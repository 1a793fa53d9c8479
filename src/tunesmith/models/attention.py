"""Attention masking specs and the single attention entry point used by the models.

Model code never builds masks itself. It describes *what* may attend to what with an
`AttnSpec`, turns it into backend arguments once per forward with `prepare_attention`, and
calls `sdpa_attention(q, k, v, prepared)` in every layer. Swapping SDPA for FlexAttention or a
varlen kernel later only means changing `PreparedAttention` and these two functions.

Shapes used throughout:
    q: [B, H, T, hd]      queries of the current step (T new tokens)
    k, v: [B, Hkv, S, hd] keys/values incl. any cached prefix (S >= T)
    bool masks: [B or 1, 1, T, S], True = may attend
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from tunesmith.errors import TunesmithError

AttnKind = Literal["causal", "padding", "documents"]

# `enable_gqa` landed in torch 2.5; older versions need the kv heads repeated by hand.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass(frozen=True, eq=False)  # eq would compare tensors elementwise
class AttnSpec:
    """What each query may attend to.

    kind:
        "causal":    plain causal attention (fastest: SDPA `is_causal=True`).
        "padding":   causal + key padding; `attention_mask` [B, S] with 1 = real token.
                     With a KV cache, S covers cached + new tokens (HF convention).
        "documents": causal within documents; `doc_ids` [B, T] int, equal ids = same document.
                     Used for packed sequences: no attention across document boundaries.
    """

    kind: AttnKind = "causal"
    attention_mask: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None

    @classmethod
    def causal(cls) -> AttnSpec:
        return cls("causal")

    @classmethod
    def padding(cls, attention_mask: torch.Tensor) -> AttnSpec:
        if attention_mask.dim() != 2:
            raise TunesmithError(
                f"AttnSpec.padding: attention_mask must be [batch, seq], got shape "
                f"{tuple(attention_mask.shape)}"
            )
        return cls("padding", attention_mask=attention_mask)

    @classmethod
    def documents(cls, doc_ids: torch.Tensor) -> AttnSpec:
        if doc_ids.dim() != 2:
            raise TunesmithError(
                "AttnSpec.documents: doc_ids must be [batch, seq], got shape "
                f"{tuple(doc_ids.shape)}"
            )
        return cls("documents", doc_ids=doc_ids)


@dataclass(frozen=True, eq=False)
class PreparedAttention:
    """Backend arguments computed once per forward and shared by all layers.

    For SDPA: either `is_causal=True` with no mask, or a bool `mask` [B|1, 1, T, S], or
    neither (every query sees every key, e.g. one-token decode steps).
    """

    mask: torch.Tensor | None
    is_causal: bool


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every document boundary.

    doc_ids: [B, T] int -> positions [B, T] long. A new document starts wherever the id
    differs from the previous token's id (so ids need not be sorted or unique per row).
    """
    b, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand(b, t)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # Index of the most recent document start at or before each token: [B, T].
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def _causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Bottom-right aligned causal mask [T, S]: query i sits at absolute position S - T + i."""
    offset = kv_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    k_pos = torch.arange(kv_len, device=device)[None, :]
    return k_pos <= q_pos


def prepare_attention(
    spec: AttnSpec | None, q_len: int, kv_len: int, device: torch.device
) -> PreparedAttention:
    """Turn a spec into SDPA arguments for T=q_len new queries over S=kv_len keys."""
    spec = spec or AttnSpec()
    if spec.kind == "causal":
        if q_len == kv_len:
            return PreparedAttention(mask=None, is_causal=True)
        if q_len == 1:
            # A single new token attends to the whole prefix: no mask needed.
            return PreparedAttention(mask=None, is_causal=False)
        return PreparedAttention(_causal_mask(q_len, kv_len, device)[None, None], is_causal=False)
    if spec.kind == "padding":
        return PreparedAttention(_padding_mask(spec, q_len, kv_len, device), is_causal=False)
    if spec.kind == "documents":
        return PreparedAttention(_documents_mask(spec, q_len, kv_len, device), is_causal=False)
    raise TunesmithError(
        f"unknown attention kind {spec.kind!r}; known: causal, padding, documents"
    )


def _padding_mask(spec: AttnSpec, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    keep = spec.attention_mask
    assert keep is not None
    if keep.shape[1] != kv_len:
        raise TunesmithError(
            f"attention_mask covers {keep.shape[1]} tokens but attention spans {kv_len} "
            "(cached + new); pass a mask for the whole sequence"
        )
    causal = _causal_mask(q_len, kv_len, device)  # [T, S]
    mask = causal[None] & keep.to(device=device, dtype=torch.bool)[:, None, :]  # [B, T, S]
    # Padded queries would otherwise see no key at all -> softmax NaN, and NaN hidden states
    # leak into later layers through 0 * NaN in the value matmul. Let each query see itself;
    # outputs at padded positions are meaningless anyway.
    return (mask | _self_mask(q_len, kv_len, device)[None])[:, None]  # [B, 1, T, S]


def _self_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[T, S] with True only where the key is the query's own token."""
    offset = kv_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    k_pos = torch.arange(kv_len, device=device)[None, :]
    return k_pos == q_pos


def _documents_mask(
    spec: AttnSpec, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor:
    doc = spec.doc_ids
    assert doc is not None
    if q_len != kv_len or doc.shape[1] != q_len:
        raise TunesmithError(
            "documents attention needs doc_ids for every token and no KV cache "
            f"(doc_ids covers {doc.shape[1]}, queries {q_len}, keys {kv_len})"
        )
    doc = doc.to(device)
    same_doc = doc[:, :, None] == doc[:, None, :]  # [B, T, T]
    return (same_doc & _causal_mask(q_len, kv_len, device)[None])[:, None]  # [B, 1, T, T]


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn: PreparedAttention | AttnSpec | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with GQA. q [B,H,T,hd], k/v [B,Hkv,S,hd] -> [B,H,T,hd].

    `attn` is normally prepared once per forward; an `AttnSpec` (or None = causal) is
    prepared on the fly for convenience.
    """
    if not isinstance(attn, PreparedAttention):
        attn = prepare_attention(attn, q.shape[2], k.shape[2], q.device)
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1 and not _SDPA_HAS_GQA:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
        n_rep = 1
    kwargs = {"enable_gqa": True} if n_rep > 1 else {}
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn.mask, is_causal=attn.is_causal, **kwargs
    )
