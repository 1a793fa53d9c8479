"""State-dict adapter between native `BertMLM` and HF `BertForMaskedLM` / `RobertaForMaskedLM`.

Tensors map 1:1; only names change. On load this also accepts what real checkpoints carry:
the pre-training heads' extra tensors (`bert.pooler.*`, `cls.seq_relationship.*`, the
`embeddings.position_ids` buffer) are ignored, TF-era LayerNorm names (`gamma`/`beta`) are
read as weight/bias, and the decoder bias may appear as `cls.predictions.bias`,
`cls.predictions.decoder.bias` or both (they are one tensor in HF).
"""

from __future__ import annotations

import re

from tunesmith.errors import TunesmithError
from tunesmith.models.adapter_base import StateDictAdapter

_LAYER_MAP = {
    "attention.wq": "attention.self.query",
    "attention.wk": "attention.self.key",
    "attention.wv": "attention.self.value",
    "attention.wo": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "feed_forward.w1": "intermediate.dense",
    "feed_forward.w2": "output.dense",
    "ffn_norm": "output.LayerNorm",
}
_HF_LAYER_MAP = {v: k for k, v in _LAYER_MAP.items()}
_NATIVE_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def _top_map(prefix: str, head: str, head_norm: str, decoder: str) -> dict[str, str]:
    """Native -> HF names outside the layers, for base prefix `bert`/`roberta`."""
    return {
        "tok_embeddings.weight": f"{prefix}.embeddings.word_embeddings.weight",
        "pos_embeddings.weight": f"{prefix}.embeddings.position_embeddings.weight",
        "type_embeddings.weight": f"{prefix}.embeddings.token_type_embeddings.weight",
        "emb_norm.weight": f"{prefix}.embeddings.LayerNorm.weight",
        "emb_norm.bias": f"{prefix}.embeddings.LayerNorm.bias",
        "head_dense.weight": f"{head}.dense.weight",
        "head_dense.bias": f"{head}.dense.bias",
        "head_norm.weight": f"{head_norm}.weight",
        "head_norm.bias": f"{head_norm}.bias",
        "output.weight": f"{decoder}.decoder.weight",
        "output.bias": f"{decoder}.bias",
    }


class BertStateDictAdapter(StateDictAdapter):
    def __init__(self, cfg) -> None:  # noqa: ANN001 - BertConfig
        super().__init__(cfg)
        if cfg.model_type == "roberta":
            self.prefix = "roberta"
            self.top = _top_map("roberta", "lm_head", "lm_head.layer_norm", "lm_head")
            self.ignored = re.compile(r"^(roberta\.pooler\.|roberta\.embeddings\.position_ids$)")
            self.bias_alias = "lm_head.decoder.bias"
        else:
            self.prefix = "bert"
            self.top = _top_map("bert", "cls.predictions.transform",
                                "cls.predictions.transform.LayerNorm", "cls.predictions")
            self.ignored = re.compile(
                r"^(bert\.pooler\.|cls\.seq_relationship\.|bert\.embeddings\.position_ids$)")
            self.bias_alias = "cls.predictions.decoder.bias"
        self.hf_top = {v: k for k, v in self.top.items()}
        self.hf_layer_re = re.compile(
            rf"^{self.prefix}\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")

    def native_key_to_hf(self, key: str) -> str | None:
        if key == "output.weight" and self.cfg.tie_word_embeddings:
            return None
        if key in self.top:
            return self.top[key]
        m = _NATIVE_LAYER_RE.match(key)
        if m and m.group(2) in _LAYER_MAP:
            return f"{self.prefix}.encoder.layer.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
        raise TunesmithError(f"state dict: no HF name for parameter {key!r}")

    def hf_key_to_native(self, key: str) -> str | None:
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias")
        if self.ignored.search(key):
            return None
        if key == self.bias_alias:
            return "output.bias"
        if key == self.top["output.weight"] and self.cfg.tie_word_embeddings:
            return None
        if key in self.hf_top:
            return self.hf_top[key]
        m = self.hf_layer_re.match(key)
        if m and m.group(2) in _HF_LAYER_MAP:
            return f"layers.{m.group(1)}.{_HF_LAYER_MAP[m.group(2)]}.{m.group(3)}"
        raise TunesmithError(
            f"checkpoint: unexpected tensor {key!r} for a {self.cfg.model_type} masked-LM model"
        )
