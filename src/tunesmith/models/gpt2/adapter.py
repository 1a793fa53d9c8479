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

from tunesmith.errors import TunesmithError
from tunesmith.models.adapter_base import StateDictAdapter

_LAYER_MAP = {
    "attention_norm": "ln_1",
    "attention.wqkv": "attn.c_attn",
    "attention.wo": "attn.c_proj",
    "ffn_norm": "ln_2",
    "feed_forward.w1": "mlp.c_fc",
    "feed_forward.w2": "mlp.c_proj",
}
_HF_LAYER_MAP = {v: k for k, v in _LAYER_MAP.items()}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_TOP_MAP = {
    "tok_embeddings.weight": "transformer.wte.weight",
    "pos_embeddings.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
_HF_TOP_MAP = {v: k for k, v in _TOP_MAP.items()}
_NATIVE_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"^transformer\.h\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BUFFER_RE = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


def _with_prefix(key: str) -> str:
    """Old OpenAI-converted checkpoints have no `transformer.` prefix on the body."""
    if key.startswith(("transformer.", "lm_head.")):
        return key
    return "transformer." + key


class GPT2StateDictAdapter(StateDictAdapter):
    def native_key_to_hf(self, key: str) -> str | None:
        if key == "output.weight" and self.cfg.tie_word_embeddings:
            return None
        if key in _TOP_MAP:
            return _TOP_MAP[key]
        m = _NATIVE_LAYER_RE.match(key)
        if m and m.group(2) in _LAYER_MAP:
            return f"transformer.h.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
        raise TunesmithError(f"state dict: no HF name for parameter {key!r}")

    def hf_key_to_native(self, key: str) -> str | None:
        key = _with_prefix(key)
        if key == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return None
        if _HF_BUFFER_RE.match(key):
            return None  # causal-mask buffers of old checkpoints: no learned state
        if key in _HF_TOP_MAP:
            return _HF_TOP_MAP[key]
        m = _HF_LAYER_RE.match(key)
        if m and m.group(2) in _HF_LAYER_MAP:
            return f"layers.{m.group(1)}.{_HF_LAYER_MAP[m.group(2)]}.{m.group(3)}"
        raise TunesmithError(f"checkpoint: unexpected tensor {key!r} for a GPT-2 model")

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
