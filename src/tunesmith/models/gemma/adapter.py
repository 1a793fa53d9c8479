"""State-dict adapter between native `Gemma` names and HF `Gemma3ForCausalLM` names.

Rotate-half RoPE and [out, in] linears on both sides: tensors map 1:1, only names change.
Tied embeddings: `lm_head.weight` is dropped when saving and ignored when loading.
A config read from an image+text `gemma3` checkpoint (`cfg.multimodal_source`) also reads its
prefixed language-model names and skips its vision tower (`gemma.multimodal.text_key`); saves
write Gemma3ForCausalLM names either way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tunesmith.models.adapter_base import TableAdapter
from tunesmith.models.gemma import multimodal
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

    def hf_key_to_native(self, key: str) -> str | None:
        if self.cfg.multimodal_source:
            text = multimodal.text_key(key)
            if text is None:  # vision tower / projector: not part of the text model
                return None
            key = text
        return super().hf_key_to_native(key)

    def hf_save_view(self, names: list[str], get_tensor: Callable[[str], torch.Tensor],
                     nbytes: Callable[[str], int]
                     ) -> tuple[list[str], Callable[[str], torch.Tensor], Callable[[str], int]]:
        if self.cfg.multimodal_source:
            multimodal.log.info("save: the text model of the image+text Gemma 3 is written as a "
                                "gemma3_text model (transformers loads it as Gemma3ForCausalLM)")
        return names, get_tensor, nbytes
