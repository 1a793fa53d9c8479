"""State-dict adapter between native `NeoX` and HF `GPTNeoXForCausalLM` (1:1 tensors).

Old checkpoints also carry non-learned buffers (`attention.bias`, `attention.masked_bias`,
`attention.rotary_emb.inv_freq`); they are ignored on load.
"""

from __future__ import annotations

import re

from tunesmith.models.adapter_base import TableAdapter

_LAYER_MAP = {
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attention.wqkv": "attention.query_key_value",
    "attention.wo": "attention.dense",
    "feed_forward.w1": "mlp.dense_h_to_4h",
    "feed_forward.w2": "mlp.dense_4h_to_h",
}
_TOP_MAP = {
    "tok_embeddings.weight": "gpt_neox.embed_in.weight",
    "norm.weight": "gpt_neox.final_layer_norm.weight",
    "norm.bias": "gpt_neox.final_layer_norm.bias",
    "output.weight": "embed_out.weight",
}
_HF_BUFFER_RE = re.compile(
    r"^gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")


class NeoXStateDictAdapter(TableAdapter):
    FAMILY = "GPT-NeoX"
    LAYER_MAP = _LAYER_MAP
    TOP_MAP = _TOP_MAP
    HF_LAYER_PREFIX = "gpt_neox.layers"
    HF_HEAD = "embed_out.weight"
    HF_IGNORED = _HF_BUFFER_RE
