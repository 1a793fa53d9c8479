"""State-dict adapter between native `GPT2` and HF `GPT2LMHeadModel`.

HF GPT-2 uses `Conv1D` layers whose weight is stored [in, out] (the transpose of nn.Linear), so
c_attn / c_proj / c_fc weights are transposed both ways. Checkpoints written by the original
OpenAI conversion have no `transformer.` prefix (`h.0.attn.c_attn.weight`, `wte.weight`) and may
hold the causal-mask buffers `attn.bias` / `attn.masked_bias`; both forms load. Saves use the
current layout (`transformer.` prefix, tied `lm_head.weight` left out).
"""

from __future__ import annotations

import re

import torch

from tunesmith.models.adapter_base import TableAdapter

_LAYER_MAP = {
    "attention_norm": "ln_1",
    "attention.wqkv": "attn.c_attn",
    "attention.wo": "attn.c_proj",
    "ffn_norm": "ln_2",
    "feed_forward.w1": "mlp.c_fc",
    "feed_forward.w2": "mlp.c_proj",
}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_TOP_MAP = {
    "tok_embeddings.weight": "transformer.wte.weight",
    "pos_embeddings.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
_HF_BUFFER_RE = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


def _with_prefix(key: str) -> str:
    """Old OpenAI-converted checkpoints have no `transformer.` prefix on the body."""
    if key.startswith(("transformer.", "lm_head.")):
        return key
    return "transformer." + key


class GPT2StateDictAdapter(TableAdapter):
    FAMILY = "GPT-2"
    LAYER_MAP = _LAYER_MAP
    TOP_MAP = _TOP_MAP
    HF_LAYER_PREFIX = "transformer.h"
    HF_HEAD = "lm_head.weight"
    HF_IGNORED = _HF_BUFFER_RE

    def normalize_hf_key(self, key: str) -> str:
        return _with_prefix(key)

    @staticmethod
    def _is_conv1d_weight(hf_key: str) -> bool:
        hf_key = _with_prefix(hf_key)
        return hf_key.endswith(".weight") and any(f".{c}." in hf_key for c in _CONV1D)

    def tensor_to_native(self, hf_key: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if self._is_conv1d_weight(hf_key) else tensor  # [in, out] -> [out, in]

    def tensor_to_hf(self, native_key: str, tensor: torch.Tensor) -> torch.Tensor:
        hf_key = self.native_key_to_hf(native_key)
        if hf_key is not None and self._is_conv1d_weight(hf_key):
            return tensor.t()  # [out, in] -> Conv1D's [in, out]
        return tensor

    def shape_to_native(self, hf_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(shape)) if self._is_conv1d_weight(hf_key) else shape
