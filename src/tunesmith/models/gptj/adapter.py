"""State-dict adapter between native `GPTJ` and HF `GPTJForCausalLM` (1:1 tensors, HF names).

Old checkpoints (EleutherAI/gpt-j-6b) also carry the causal-mask buffers `attn.bias` and
`attn.masked_bias`; they hold no learned state and are ignored on load.
"""

from __future__ import annotations

import re

from tunesmith.models.adapter_base import TableAdapter

_LAYER_MAP = {
    "attention_norm": "ln_1",
    "attention.wq": "attn.q_proj",
    "attention.wk": "attn.k_proj",
    "attention.wv": "attn.v_proj",
    "attention.wo": "attn.out_proj",
    "feed_forward.w1": "mlp.fc_in",
    "feed_forward.w2": "mlp.fc_out",
}
_TOP_MAP = {
    "tok_embeddings.weight": "transformer.wte.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
    "output.bias": "lm_head.bias",
}
_HF_BUFFER_RE = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


class GPTJStateDictAdapter(TableAdapter):
    FAMILY = "GPT-J"
    LAYER_MAP = _LAYER_MAP
    TOP_MAP = _TOP_MAP
    HF_LAYER_PREFIX = "transformer.h"
    HF_HEAD = "lm_head.weight"
    HF_IGNORED = _HF_BUFFER_RE
