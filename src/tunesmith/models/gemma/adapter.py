"""State-dict adapter between native `Gemma` names and HF `Gemma3ForCausalLM` names.

Rotate-half RoPE and [out, in] linears on both sides: tensors map 1:1, only names change.
Tied embeddings: `lm_head.weight` is dropped when saving and ignored when loading.
"""

from __future__ import annotations

from tunesmith.models.adapter_base import TableAdapter
from tunesmith.models.gemma.config import GemmaConfig

# native per-layer suffix <-> HF per-layer suffix (each with .weight / .bias appended)
_LAYER_MAP = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffn_norm": "post_feedforward_layernorm",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GemmaStateDictAdapter(TableAdapter):
    """Maps names both ways for one config (needs `tie_word_embeddings`)."""

    cfg: GemmaConfig

    FAMILY = "Gemma 3"
    LAYER_MAP = _LAYER_MAP
    TOP_MAP = _TOP_MAP
    HF_LAYER_PREFIX = "model.layers"
    HF_HEAD = "lm_head.weight"
