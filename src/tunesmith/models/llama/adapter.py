"""State-dict adapter between native `Llama` names and HF `LlamaForCausalLM`-style names.

Both use the rotate-half RoPE layout, so tensors map 1:1 with no permutation; only names change.
Tied embeddings: `lm_head.weight` is dropped when saving and tolerated (ignored) when loading.
"""

from __future__ import annotations

import re


from tunesmith.errors import TunesmithError
from tunesmith.models.adapter_base import StateDictAdapter
from tunesmith.models.llama.config import LlamaConfig

# native per-layer suffix <-> HF per-layer suffix (each with .weight / .bias appended)
_LAYER_MAP = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_HF_LAYER_MAP = {v: k for k, v in _LAYER_MAP.items()}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_TOP_MAP = {v: k for k, v in _TOP_MAP.items()}
_NATIVE_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
# Keys some older HF checkpoints carry that hold no learned state.
_HF_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class LlamaStateDictAdapter(StateDictAdapter):
    """Maps names both ways for one config (needs `tie_word_embeddings`). Tensors map 1:1, so
    the base class's whole-state-dict `to_hf` / `from_hf` apply unchanged (a tied model saves
    no `lm_head.weight` and loads only `tok_embeddings.weight`)."""

    cfg: LlamaConfig

    # -- single keys (used for streaming loads) -------------------------------------------
    def native_key_to_hf(self, key: str) -> str | None:
        """HF name for a native key, or None when it is not saved (tied output head)."""
        if key == "output.weight" and self.cfg.tie_word_embeddings:
            return None
        if key in _TOP_MAP:
            return _TOP_MAP[key]
        m = _NATIVE_LAYER_RE.match(key)
        if m and m.group(2) in _LAYER_MAP:
            return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
        raise TunesmithError(f"state dict: no HF name for parameter {key!r}")

    def hf_key_to_native(self, key: str) -> str | None:
        """Native name for a HF key; None for keys that are ignored on load
        (lm_head of a tied model, rotary inv_freq); raises for unknown keys."""
        if key == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return None
        if _HF_IGNORED_RE.search(key):
            return None
        if key in _HF_TOP_MAP:
            return _HF_TOP_MAP[key]
        m = _HF_LAYER_RE.match(key)
        if m and m.group(2) in _HF_LAYER_MAP:
            return f"layers.{m.group(1)}.{_HF_LAYER_MAP[m.group(2)]}.{m.group(3)}"
        raise TunesmithError(f"checkpoint: unexpected tensor {key!r} for a Llama-family model")

    def is_known_hf_key(self, key: str) -> bool:
        try:
            self.hf_key_to_native(key)
        except TunesmithError:
            return False
        return True
