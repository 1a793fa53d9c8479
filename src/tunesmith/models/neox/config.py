"""GPT-NeoX (Pythia) configuration and its HF `config.json` mapping.

GPT-NeoX: pre-LayerNorm decoder with biases, partial rotary embeddings (the first
`rotary_pct` of each head's dims, rotate-half layout), exact GELU, a parallel residual
(x + attn(ln1 x) + mlp(ln2 x)) by default, and an untied output head. Reads both the
transformers 5 layout (`rope_parameters`) and the 4.x one (`rotary_pct`, `rotary_emb_base`).
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

_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")

HF_KEY_MAP: dict[str, str] = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "layer_norm_eps": "norm_eps",
    "hidden_act": "activation",
    "use_parallel_residual": "use_parallel_residual",
    "attention_bias": "attention_bias",
    **COMMON_HF_KEYS,
    "rotary_pct": "rotary_pct",
    "rotary_emb_base": "rope_theta",
}


@dataclass
class NeoXConfig:
    vocab_size: int = 50304
    dim: int = 512
    n_layers: int = 6
    n_heads: int = 8
    intermediate_size: int = 2048
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    activation: str = "gelu"
    rotary_pct: float = 0.25
    rope_theta: float = 10000.0
    use_parallel_residual: bool = True
    attention_bias: bool = True
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = None
    model_type: str = "gpt_neox"
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    def validate(self) -> None:
        where = "model config (gpt_neox)"
        check_positive(self, where, ("vocab_size", "dim", "n_layers", "n_heads",
                                     "intermediate_size", "max_position_embeddings"))
        if self.dim % self.n_heads:
            raise TunesmithError(f"{where}: hidden_size ({self.dim}) must be a multiple of "
                                 f"num_attention_heads ({self.n_heads})")
        if not 0 < self.rotary_pct <= 1 or self.rotary_dim % 2:
            raise TunesmithError(f"{where}: rotary_pct={self.rotary_pct} must give an even "
                                 f"number of rotary dims per head (head_dim {self.head_dim})")
        if self.activation not in _ACTIVATIONS:
            raise TunesmithError(f"{where}: hidden_act {self.activation!r} is not supported; "
                                 f"known: {', '.join(_ACTIVATIONS)}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> NeoXConfig:
        if hf.get("model_type", "gpt_neox") != "gpt_neox":
            raise TunesmithError(f"config.json: model_type {hf.get('model_type')!r} is not "
                                 "gpt_neox")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in (None, "default"):
            raise TunesmithError(f"config.json: GPT-NeoX rope type {rtype!r} is not supported")
        kw, extra = split_hf_keys(hf, HF_KEY_MAP, skip=("architectures", "rope_parameters",
                                                        "rope_scaling"))
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if "partial_rotary_factor" in rope:
            kw["rotary_pct"] = rope["partial_rotary_factor"]
        kw.setdefault("tie_word_embeddings", False)
        return cls(**kw, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        self.validate()
        out: dict[str, Any] = {k: v for k, v in self.extra.items() if k != "transformers_version"}
        out.update({
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "layer_norm_eps": self.norm_eps,
            "hidden_act": self.activation,
            "use_parallel_residual": self.use_parallel_residual,
            "attention_bias": self.attention_bias,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.torch_dtype,
            # transformers 5 reads rope_parameters; 4.x reads rotary_pct / rotary_emb_base.
            "rope_parameters": {"rope_type": "default", "rope_theta": float(self.rope_theta),
                                "partial_rotary_factor": float(self.rotary_pct)},
            "rotary_pct": float(self.rotary_pct),
            "rotary_emb_base": float(self.rope_theta),
        })
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def n_matmul_params_per_layer(self) -> int:
        return 4 * self.dim * self.dim + 2 * self.dim * self.intermediate_size


def apply_overrides(cfg: NeoXConfig, overrides: dict[str, Any] | None) -> NeoXConfig:
    out = override_fields(cfg, overrides, HF_KEY_MAP)
    out.validate()
    return out


def _preset_table() -> dict[str, dict[str, Any]]:
    return {  # Pythia shapes (vocab padded to 50304, rotary_pct 0.25, parallel residual)
        "pythia-70m": dict(dim=512, n_layers=6, n_heads=8, intermediate_size=2048),
        "pythia-160m": dict(dim=768, n_layers=12, n_heads=12, intermediate_size=3072),
        "pythia-410m": dict(dim=1024, n_layers=24, n_heads=16, intermediate_size=4096),
        "pythia-1b": dict(dim=2048, n_layers=16, n_heads=8, intermediate_size=8192),
        "pythia-tiny": dict(dim=64, n_layers=2, n_heads=4, intermediate_size=256,
                            max_position_embeddings=512),
    }


PRESET_NAMES: tuple[str, ...] = tuple(_preset_table())


def preset(name: str) -> NeoXConfig:
    return preset_from_table(NeoXConfig, _preset_table(), name, "GPT-NeoX")
