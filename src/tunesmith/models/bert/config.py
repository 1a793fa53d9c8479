"""BERT / RoBERTa encoder configuration and its HF `config.json` mapping.

The two share one architecture (post-LayerNorm encoder, learned positions, token types, MLM
head tied to the word embeddings). RoBERTa differs only in data: its positions start after the
padding index (`position_offset = pad_token_id + 1`), so position row `pad_token_id` is the one
padding tokens get, exactly as HF `create_position_ids_from_input_ids` does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.models.common import (
    COMMON_HF_KEYS,
    check_positive,
    override_fields,
    preset_from_table,
    split_hf_keys,
)

MODEL_TYPES = ("bert", "roberta")
_ARCHITECTURES = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM"}
_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")

HF_KEY_MAP: dict[str, str] = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "norm_eps",
    "hidden_act": "activation",
    **COMMON_HF_KEYS,
}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    activation: str = "gelu"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = 0
    model_type: str = "bert"
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def position_offset(self) -> int:
        """Row of the position table used for position 0 (RoBERTa: after the padding row)."""
        if self.model_type == "roberta":
            return (self.pad_token_id if self.pad_token_id is not None else 1) + 1
        return 0

    @property
    def max_positions(self) -> int:
        """Longest sequence the position table covers."""
        return self.max_position_embeddings - self.position_offset

    def validate(self) -> None:
        where = f"model config ({self.model_type})"
        if self.model_type not in MODEL_TYPES:
            raise TunesmithError(f"{where}: model_type must be one of {', '.join(MODEL_TYPES)}")
        check_positive(self, where, ("vocab_size", "dim", "n_layers", "n_heads",
                                     "intermediate_size", "max_position_embeddings",
                                     "type_vocab_size"))
        if self.dim % self.n_heads:
            raise TunesmithError(
                f"{where}: hidden_size ({self.dim}) must be a multiple of num_attention_heads "
                f"({self.n_heads})"
            )
        if self.activation not in _ACTIVATIONS:
            raise TunesmithError(
                f"{where}: hidden_act {self.activation!r} is not supported; "
                f"known: {', '.join(_ACTIVATIONS)}"
            )
        if self.max_positions <= 0:
            raise TunesmithError(f"{where}: max_position_embeddings leaves no usable positions")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> BertConfig:
        mt = hf.get("model_type", "bert")
        if mt not in MODEL_TYPES:
            raise TunesmithError(f"config.json: model_type {mt!r} is not bert or roberta")
        pet = hf.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise TunesmithError(
                f"config.json: position_embedding_type {pet!r} is not supported (only absolute)"
            )
        kw, extra = split_hf_keys(hf, HF_KEY_MAP, skip=("architectures",))
        kw.setdefault("tie_word_embeddings", True)
        return cls(**kw, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        self.validate()
        out: dict[str, Any] = {k: v for k, v in self.extra.items() if k != "transformers_version"}
        out.update({
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.norm_eps,
            "hidden_act": self.activation,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "position_embedding_type": "absolute",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.torch_dtype,
        })
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def n_matmul_params_per_layer(self) -> int:
        return 4 * self.dim * self.dim + 2 * self.dim * self.intermediate_size


def apply_overrides(cfg: BertConfig, overrides: dict[str, Any] | None) -> BertConfig:
    out = override_fields(cfg, overrides, HF_KEY_MAP)
    out.validate()
    return out


def _preset_table() -> dict[str, dict[str, Any]]:
    roberta = dict(model_type="roberta", vocab_size=50265, max_position_embeddings=514,
                   type_vocab_size=1, norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                   eos_token_id=2)
    return {
        "bert-base": dict(),
        "bert-large": dict(dim=1024, n_layers=24, n_heads=16, intermediate_size=4096),
        "roberta-base": dict(roberta),
        "roberta-large": dict(roberta, dim=1024, n_layers=24, n_heads=16, intermediate_size=4096),
        # Test/demo size with the real RoBERTa (= GPT-2 byte-level) vocabulary.
        "roberta-tiny": dict(roberta, dim=64, n_layers=2, n_heads=4, intermediate_size=128,
                             max_position_embeddings=258),
    }


PRESET_NAMES: tuple[str, ...] = tuple(_preset_table())


def preset(name: str) -> BertConfig:
    return preset_from_table(BertConfig, _preset_table(), name, "encoder")
