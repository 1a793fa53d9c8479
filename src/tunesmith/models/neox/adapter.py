"""State-dict adapter between native `NeoX` and HF `GPTNeoXForCausalLM` (1:1 tensors).

Old checkpoints also carry non-learned buffers (`attention.bias`, `attention.masked_bias`,
`attention.rotary_emb.inv_freq`); they are ignored on load.
"""

from __future__ import annotations

import re

from tunesmith.errors import TunesmithError
from tunesmith.models.adapter_base import StateDictAdapter

_LAYER_MAP = {
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attention.wqkv": "attention.query_key_value",
    "attention.wo": "attention.dense",
    "feed_forward.w1": "mlp.dense_h_to_4h",
    "feed_forward.w2": "mlp.dense_4h_to_h",
}
_HF_LAYER_MAP = {v: k for k, v in _LAYER_MAP.items()}
_TOP_MAP = {
    "tok_embeddings.weight": "gpt_neox.embed_in.weight",
    "norm.weight": "gpt_neox.final_layer_norm.weight",
    "norm.bias": "gpt_neox.final_layer_norm.bias",
    "output.weight": "embed_out.weight",
}
_HF_TOP_MAP = {v: k for k, v in _TOP_MAP.items()}
_NATIVE_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"^gpt_neox\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BUFFER_RE = re.compile(
    r"^gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")


class NeoXStateDictAdapter(StateDictAdapter):
    def native_key_to_hf(self, key: str) -> str | None:
        if key == "output.weight" and self.cfg.tie_word_embeddings:
            return None
        if key in _TOP_MAP:
            return _TOP_MAP[key]
        m = _NATIVE_LAYER_RE.match(key)
        if m and m.group(2) in _LAYER_MAP:
            return f"gpt_neox.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
        raise TunesmithError(f"state dict: no HF name for parameter {key!r}")

    def hf_key_to_native(self, key: str) -> str | None:
        if key == "embed_out.weight" and self.cfg.tie_word_embeddings:
            return None
        if _HF_BUFFER_RE.match(key):
            return None
        if key in _HF_TOP_MAP:
            return _HF_TOP_MAP[key]
        m = _HF_LAYER_RE.match(key)
        if m and m.group(2) in _HF_LAYER_MAP:
            return f"layers.{m.group(1)}.{_HF_LAYER_MAP[m.group(2)]}.{m.group(3)}"
        raise TunesmithError(f"checkpoint: unexpected tensor {key!r} for a GPT-NeoX model")
