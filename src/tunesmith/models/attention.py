"""Attention masking specs and the single attention entry point used by the models.

Model code never builds masks itself. It describes *what* may attend to what with an
`AttnSpec`, turns it into backend arguments once per forward with `prepare_attention`, and
calls `sdpa_attention(q, k, v, prepared)` in every layer. Decoders are causal; encoders (BERT,
RoBERTa) prepare the same specs with `causal=False`.

Backends: SDPA with a dense bool mask everywhere, except packed documents on CUDA, where
FlexAttention with a block mask built from the doc ids skips the fully masked tiles (a dense
[B, 1, T, T] mask costs O(T^2) memory and gives SDPA no way to skip work). The choice is made
in `prepare_attention` (see `attention_backend`); layers only ever call `sdpa_attention`.

Sliding windows (Gemma 3's local layers): `prepare_attention(..., window=W)` further limits
every spec to keys less than W slots before the query (HF's `kv_idx > q_idx - W`), on top of
its causal, padding or document structure; a model with both kinds of layer prepares twice.
Without a window nothing changes. With one, causal and document masks of one training
sequence use FlexAttention on CUDA as well, so the tiles outside the window are skipped.

Shapes used throughout:
    q: [B, H, T, hd]      queries of the current step (T new tokens)
    k, v: [B, Hkv, S, hd] keys/values incl. any cached prefix (S >= T)
    bool masks: [B or 1, 1, T, S], True = may attend
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from tunesmith.errors import TunesmithError

AttnKind = Literal["causal", "padding", "documents", "keys", "custom"]
Backend = Literal["auto", "sdpa", "flex"]
_BACKENDS = ("auto", "sdpa", "flex")
# Process-wide choice; TUNESMITH_ATTENTION=sdpa|flex|auto overrides the default "auto".
_backend: str = os.environ.get("TUNESMITH_ATTENTION", "auto")

# SDPA kernel preference on CUDA; TUNESMITH_SDPA=auto|cudnn|flash|efficient|default overrides.
_SDPA_CHOICES = ("auto", "cudnn", "flash", "efficient", "default")
_sdpa_pref: str = os.environ.get("TUNESMITH_SDPA", "auto")

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
        "keys":      every query sees exactly the keys where `attention_mask` [B, S] is 1, as
                     given (no causal or self term added): decode steps over a static KV cache
                     whose unwritten slots are 0, so shapes never change (CUDA graphs).
        "custom":    `attend(q, k, v) -> out` replaces the backend and carries its own mask
                     (context parallelism's ring attention, set from outside the model; it
                     also takes `scale=` and, on a sliding-window layer, `window=`).
    """

    kind: AttnKind = "causal"
    attention_mask: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

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
    def keys(cls, key_mask: torch.Tensor) -> AttnSpec:
        if key_mask.dim() != 2:
            raise TunesmithError(
                f"AttnSpec.keys: key_mask must be [batch, keys], got {tuple(key_mask.shape)}")
        return cls("keys", attention_mask=key_mask)

    @classmethod
    def documents(cls, doc_ids: torch.Tensor) -> AttnSpec:
        if doc_ids.dim() != 2:
            raise TunesmithError(
                "AttnSpec.documents: doc_ids must be [batch, seq], got shape "
                f"{tuple(doc_ids.shape)}"
            )
        return cls("documents", doc_ids=doc_ids)

    @classmethod
    def custom(cls, attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> AttnSpec:
        """q [B, H, T, hd], k/v [B, Hkv, T, hd] -> [B, H, T, hd], masking included."""
        return cls("custom", attend=attend)


@dataclass(frozen=True, eq=False)
class PreparedAttention:
    """Backend arguments computed once per forward and shared by all layers.

    For SDPA: either `is_causal=True` with no mask, or a bool `mask` [B|1, 1, T, S], or
    neither (every query sees every key, e.g. one-token decode steps).
    For FlexAttention: `block_mask` (a torch BlockMask over [B, T, S]); mask/is_causal unused.
    """

    mask: torch.Tensor | None
    is_causal: bool
    block_mask: Any = None
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def set_attention_backend(name: str) -> None:
    """Choose the backend for packed documents: auto (flex on CUDA when available), sdpa, flex.

    "flex" also works on CPU (eager, slow): it exists so tests can check it against SDPA.
    """
    global _backend
    if name not in _BACKENDS:
        raise TunesmithError(f"unknown attention backend {name!r}; known: {', '.join(_BACKENDS)}")
    _backend = name


def attention_backend(device: torch.device) -> str:
    """The backend `prepare_attention` uses for documents masks on `device`: sdpa or flex."""
    if _backend not in _BACKENDS:
        raise TunesmithError(
            f"TUNESMITH_ATTENTION={_backend!r} is not a backend; use one of {', '.join(_BACKENDS)}"
        )
    if _backend != "auto":
        return _backend if _backend == "sdpa" or _flex_available() else "sdpa"
    return "flex" if device.type == "cuda" and _flex_available() else "sdpa"


def configure_sdpa(device: torch.device, choice: str | None = None) -> str:
    """Set the process-wide SDPA kernel priority for `device`; returns the kernel put first.

    SDPA tries its backends in a fixed order that puts FlashAttention-2 first. On Hopper
    (sm_90) cuDNN's fused attention is much faster for training shapes (measured in
    benchmarks/RESULTS.md) at the same accuracy, so "auto" puts cuDNN first there and keeps
    torch's order elsewhere. This is a priority, not a restriction: a call cuDNN cannot serve
    (a mask it does not support, say) falls back to the next kernel exactly as before. Set once
    at setup (before any compile traces attention), never per call.
    """
    choice = choice or _sdpa_pref
    if choice not in _SDPA_CHOICES:
        raise TunesmithError(
            f"TUNESMITH_SDPA={choice!r} is not a kernel choice; use one of {', '.join(_SDPA_CHOICES)}"
        )
    if device.type != "cuda":
        return "default"
    if choice == "auto":
        choice = "cudnn" if torch.cuda.get_device_capability(device)[0] == 9 else "default"
    setter = getattr(torch._C, "_set_sdp_priority_order", None)  # torch >= 2.6
    if choice == "default" or setter is None:
        return "default"
    from torch.nn.attention import SDPBackend

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[choice]
    order = [int(first)] + [b for b in torch._C._get_sdp_priority_order() if b != int(first)]
    setter(order)
    return choice


def _flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401  (torch >= 2.5)
    except ImportError:
        return False
    return True


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


def default_positions(attn: "AttnSpec | None", b: int, t: int, offset: int,
                      device: torch.device) -> torch.Tensor:
    """The positions [B, T] a decoder uses when none are given: offset + 0..T-1 (offset = the
    KV cache's length), except for a `documents` spec, where they restart at 0 in every
    packed document."""
    if attn is not None and attn.kind == "documents" and attn.doc_ids is not None:
        return document_positions(attn.doc_ids.to(device))
    return (torch.arange(t, device=device) + offset).expand(b, t)


def _causal_mask(q_len: int, kv_len: int, device: torch.device,
                 window: int | None = None) -> torch.Tensor:
    """Bottom-right aligned causal mask [T, S]: query i sits at absolute position S - T + i.
    With a window, only the keys at most window - 1 slots back stay visible."""
    offset = kv_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    k_pos = torch.arange(kv_len, device=device)[None, :]
    keep = k_pos <= q_pos
    return keep if window is None else keep & (k_pos > q_pos - window)


def prepare_attention(
    spec: AttnSpec | None, q_len: int, kv_len: int, device: torch.device, *, causal: bool = True,
    window: int | None = None,
) -> PreparedAttention:
    """Turn a spec into backend arguments for T=q_len new queries over S=kv_len keys.

    causal=False (encoders): every query may see every key allowed by the spec's padding or
    document structure, earlier or later.
    window: a causal sliding window (see the module docstring); None = unlimited.
    """
    spec = spec or AttnSpec()
    if window is not None:
        return _prepare_windowed(spec, q_len, kv_len, device, window, causal)
    if spec.kind == "custom":
        if q_len != kv_len:
            raise TunesmithError("custom attention (context parallelism) runs without a KV cache")
        return PreparedAttention(None, False, attend=spec.attend)
    if spec.kind == "causal":
        if not causal:
            return PreparedAttention(mask=None, is_causal=False)
        if q_len == kv_len:
            return PreparedAttention(mask=None, is_causal=True)
        if q_len == 1:
            # A single new token attends to the whole prefix: no mask needed.
            return PreparedAttention(mask=None, is_causal=False)
        return PreparedAttention(_causal_mask(q_len, kv_len, device)[None, None], is_causal=False)
    if spec.kind == "padding":
        return PreparedAttention(
            _padding_mask(spec, q_len, kv_len, device, causal), is_causal=False
        )
    if spec.kind == "keys":
        keys = spec.attention_mask
        assert keys is not None
        if keys.shape[1] != kv_len:
            raise TunesmithError(f"key mask covers {keys.shape[1]} keys, attention spans {kv_len}")
        return PreparedAttention(keys.to(device=device, dtype=torch.bool)[:, None, None, :],
                                 is_causal=False)  # [B, 1, 1, S]
    if spec.kind == "documents":
        _check_documents(spec, q_len, kv_len)
        if attention_backend(device) == "flex":
            block_mask = _documents_block_mask(spec, q_len, device, causal)
            return PreparedAttention(None, False, block_mask)
        return PreparedAttention(_documents_mask(spec, q_len, device, causal), is_causal=False)
    raise TunesmithError(
        f"unknown attention kind {spec.kind!r}; known: causal, padding, documents, keys, custom"
    )


def _prepare_windowed(spec: AttnSpec, q_len: int, kv_len: int, device: torch.device,
                      window: int, causal: bool) -> PreparedAttention:
    """`prepare_attention` for a sliding-window layer: the spec's mask AND the window."""
    if not causal or window <= 0:
        raise TunesmithError(f"sliding-window attention needs causal attention and a window > 0, "
                             f"got causal={causal}, window={window}")
    if spec.kind == "custom":  # context parallelism: the ring masks the window itself
        if q_len != kv_len:
            raise TunesmithError("custom attention (context parallelism) runs without a KV cache")
        return PreparedAttention(None, False, attend=functools.partial(spec.attend, window=window))
    if spec.kind == "causal":
        if kv_len <= window:  # no key is window or more slots before any query
            return prepare_attention(spec, q_len, kv_len, device)
        if q_len == kv_len and attention_backend(device) == "flex":
            return PreparedAttention(None, False, _window_block_mask(None, q_len, device, window))
        return PreparedAttention(_causal_mask(q_len, kv_len, device, window)[None, None], False)
    if spec.kind == "padding":
        mask = _padding_mask(spec, q_len, kv_len, device)  # [B, 1, T, S]; each query sees itself
        return PreparedAttention(mask & _causal_mask(q_len, kv_len, device, window), False)
    if spec.kind == "keys":
        return PreparedAttention(_window_keys(spec, q_len, kv_len, device, window), False)
    if spec.kind == "documents":
        _check_documents(spec, q_len, kv_len)
        if attention_backend(device) == "flex":
            doc = spec.doc_ids.to(device)  # type: ignore[union-attr]
            return PreparedAttention(None, False, _window_block_mask(doc, q_len, device, window))
        mask = _documents_mask(spec, q_len, device) & _causal_mask(q_len, q_len, device, window)
        return PreparedAttention(mask, is_causal=False)
    raise TunesmithError(f"unknown attention kind {spec.kind!r}; known: causal, padding, documents, keys")


def _window_keys(spec: AttnSpec, q_len: int, kv_len: int, device: torch.device,
                 window: int) -> torch.Tensor:
    """A static-cache decode step's key mask [B, 1, 1, S] cut to the window. The query is the
    newest written slot, the last key marked 1 in each row (models/decode.py writes it before
    the step), so the cut is made from device tensors alone and a CUDA graph can replay it."""
    keys = spec.attention_mask
    assert keys is not None
    if q_len != 1 or keys.shape[1] != kv_len:
        raise TunesmithError(f"a windowed key mask serves one query over all {kv_len} keys, got "
                             f"{q_len} queries over a mask of {keys.shape[1]}")
    keys = keys.to(device=device, dtype=torch.bool)  # [B, S]
    slots = torch.arange(kv_len, device=device)
    newest = torch.where(keys, slots, 0).amax(-1, keepdim=True)  # [B, 1]: the query's slot
    return (keys & (slots > newest - window))[:, None, None, :]


def _window_block_mask(doc: torch.Tensor | None, q_len: int, device: torch.device,
                       window: int) -> Any:
    """FlexAttention BlockMask over [B, T, T]: causal, within `window`, and in the same
    document when `doc` [B, T] is given; tiles wholly outside the band are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    def band(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        keep = (q_idx >= kv_idx) & (q_idx - kv_idx < window)
        return keep if doc is None else keep & (doc[b, q_idx] == doc[b, kv_idx])

    batch = None if doc is None else doc.shape[0]
    return create_block_mask(band, batch, None, q_len, q_len, device=device)


def _padding_mask(
    spec: AttnSpec, q_len: int, kv_len: int, device: torch.device, causal: bool = True
) -> torch.Tensor:
    keep = spec.attention_mask
    assert keep is not None
    if keep.shape[1] != kv_len:
        raise TunesmithError(
            f"attention_mask covers {keep.shape[1]} tokens but attention spans {kv_len} "
            "(cached + new); pass a mask for the whole sequence"
        )
    keys = keep.to(device=device, dtype=torch.bool)[:, None, :]  # [B, 1, S]
    if causal:
        mask = _causal_mask(q_len, kv_len, device)[None] & keys  # [B, T, S]
    else:
        mask = keys.expand(-1, q_len, -1)  # [B, T, S]: every real key, before or after
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


def _check_documents(spec: AttnSpec, q_len: int, kv_len: int) -> None:
    doc = spec.doc_ids
    assert doc is not None
    if q_len != kv_len or doc.shape[1] != q_len:
        raise TunesmithError(
            "documents attention needs doc_ids for every token and no KV cache "
            f"(doc_ids covers {doc.shape[1]}, queries {q_len}, keys {kv_len})"
        )


def _documents_mask(
    spec: AttnSpec, q_len: int, device: torch.device, causal: bool = True
) -> torch.Tensor:
    doc = spec.doc_ids.to(device)  # type: ignore[union-attr]  # [B, T]
    same_doc = doc[:, :, None] == doc[:, None, :]  # [B, T, T]
    if causal:
        same_doc = same_doc & _causal_mask(q_len, q_len, device)[None]
    return same_doc[:, None]  # [B, 1, T, T]


def _documents_block_mask(
    spec: AttnSpec, q_len: int, device: torch.device, causal: bool = True
) -> Any:
    """FlexAttention BlockMask: query i sees key j iff same doc id (and j <= i when causal)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = spec.doc_ids.to(device)  # type: ignore[union-attr]  # [B, T]

    def same_doc(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        keep = doc[b, q_idx] == doc[b, kv_idx]
        return keep & (q_idx >= kv_idx) if causal else keep

    # H=None: one mask shared by all heads. The mask_mod is traced, not run per element.
    return create_block_mask(same_doc, doc.shape[0], None, q_len, q_len, device=device)


_FLEX: dict[str, Callable[..., torch.Tensor]] = {}


def _flex_fn(device: torch.device) -> Callable[..., torch.Tensor]:
    """flex_attention, compiled on CUDA (eager flex is a slow reference implementation)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _FLEX:
        _FLEX["cuda"] = torch.compile(flex_attention)  # type: ignore[assignment]
    return _FLEX["cuda"]


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn: PreparedAttention | AttnSpec | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with GQA. q [B,H,T,hd], k/v [B,Hkv,S,hd] -> [B,H,T,hd].

    `attn` is normally prepared once per forward; an `AttnSpec` (or None = causal) is
    prepared on the fly for convenience. `scale` multiplies q.k (None: 1 / sqrt(hd)).
    """
    if not isinstance(attn, PreparedAttention):
        attn = prepare_attention(attn, q.shape[2], k.shape[2], q.device)
    if attn.attend is not None:
        return attn.attend(q, k, v) if scale is None else attn.attend(q, k, v, scale=scale)
    n_rep = q.shape[1] // k.shape[1]
    kwargs: dict[str, Any] = {} if scale is None else {"scale": scale}
    if attn.block_mask is not None:
        out = _flex_fn(q.device)(q, k, v, block_mask=attn.block_mask, enable_gqa=n_rep > 1,
                                 **kwargs)
        return out  # type: ignore[return-value]
    if n_rep > 1 and not _SDPA_HAS_GQA:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
        n_rep = 1
    if n_rep > 1:
        kwargs["enable_gqa"] = True
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn.mask, is_causal=attn.is_causal, **kwargs
    )
