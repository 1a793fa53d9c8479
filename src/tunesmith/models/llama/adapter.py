"""State-dict adapter between native `Llama` names and HF `LlamaForCausalLM`-style names.

Both use the rotate-half RoPE layout, so tensors map 1:1 with no permutation; only names change.
Tied embeddings: `lm_head.weight` is dropped when saving and tolerated (ignored) when loading.
"""

from __future__ import annotations

import re


from tunesmith.errors import TunesmithError
from tunesmith.models.adapter_base import TableAdapter
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
    "attention.q_norm": "self_attn.q_norm",  # Qwen3
    "attention.k_norm": "self_attn.k_norm",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Keys some older HF checkpoints carry that hold no learned state.
_HF_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class LlamaStateDictAdapter(TableAdapter):
    """Maps names both ways for one config (needs `tie_word_embeddings`). Tensors map 1:1, so
    the base class's whole-state-dict `to_hf` / `from_hf` apply unchanged (a tied model saves
    no `lm_head.weight` and loads only `tok_embeddings.weight`)."""

    cfg: LlamaConfig

    FAMILY = "Llama-family"
    LAYER_MAP = _LAYER_MAP
    TOP_MAP = _TOP_MAP
    HF_LAYER_PREFIX = "model.layers"
    HF_HEAD = "lm_head.weight"
    HF_IGNORED = _HF_IGNORED_RE

    def is_known_hf_key(self, key: str) -> bool:
        try:
            self.hf_key_to_native(key)
        except TunesmithError:
            return False
        return True
