"""GPT-2 configuration and its HF `config.json` mapping.

GPT-2 is a pre-LayerNorm decoder with learned absolute positions, biases everywhere, GELU
(tanh approximation, HF "gelu_new") and a tied output head. Dropout is not modelled (as for
Llama): fine-tuning and the recipes here run without it; `resid_pdrop` and friends are kept in
`extra` and written back on save.
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

_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu")

HF_KEY_MAP: dict[str, str] = {
    "vocab_size": "vocab_size",
    "n_embd": "dim",
    "n_layer": "n_layers",
    "n_head": "n_heads",
    "n_inner": "intermediate_size",
    "n_positions": "max_position_embeddings",
    "layer_norm_epsilon": "norm_eps",
    "activation_function": "activation",
    **COMMON_HF_KEYS,
}


@dataclass
class GPT2Config:
    """`intermediate_size` 0 means 4 * dim (HF's `n_inner: null`)."""

    vocab_size: int = 50257
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    intermediate_size: int = 0
    max_position_embeddings: int = 1024
    norm_eps: float = 1e-5
    activation: str = "gelu_new"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    model_type: str = "gpt2"
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.intermediate_size:
            self.intermediate_size = 4 * self.dim
        self.validate()

    # The KV cache and FLOP counter read these Llama-style names.
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    def validate(self) -> None:
        where = "model config (gpt2)"
        check_positive(self, where, ("vocab_size", "dim", "n_layers", "n_heads",
                                     "intermediate_size", "max_position_embeddings"))
        if self.dim % self.n_heads:
            raise TunesmithError(
                f"{where}: n_embd ({self.dim}) must be a multiple of n_head ({self.n_heads})"
            )
        if self.activation not in _ACTIVATIONS:
            raise TunesmithError(
                f"{where}: activation_function {self.activation!r} is not supported; "
                f"known: {', '.join(_ACTIVATIONS)}"
            )

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPT2Config:
        if hf.get("model_type", "gpt2") != "gpt2":
            raise TunesmithError(f"config.json: model_type {hf.get('model_type')!r} is not gpt2")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise TunesmithError(
                "config.json: GPT-2 attention scaling variants (scale_attn_by_inverse_layer_idx, "
                "scale_attn_weights=false) are not supported"
            )
        kw, extra = split_hf_keys(hf, HF_KEY_MAP, skip=("architectures", "n_ctx"))
        kw["intermediate_size"] = kw.get("intermediate_size") or 0
        kw.setdefault("tie_word_embeddings", True)
        return cls(**kw, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        self.validate()
        out: dict[str, Any] = {k: v for k, v in self.extra.items() if k != "transformers_version"}
        out.update({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_embd": self.dim,
            "n_layer": self.n_layers,
            "n_head": self.n_heads,
            "n_inner": None if self.intermediate_size == 4 * self.dim else self.intermediate_size,
            "n_positions": self.max_position_embeddings,
            "n_ctx": self.max_position_embeddings,
            "layer_norm_epsilon": self.norm_eps,
            "activation_function": self.activation,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
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


def apply_overrides(cfg: GPT2Config, overrides: dict[str, Any] | None) -> GPT2Config:
    """Overrides by our names, GPT-2 HF names (n_embd, n_head, ...) or Llama-style names.

    "Make it wider" keeps the 4x MLP unless the MLP width itself is overridden.
    """
    out = override_fields(cfg, overrides, HF_KEY_MAP)
    keys = set(overrides or {})
    widened = keys & {"dim", "n_embd", "hidden_size"}
    if widened and not keys & {"intermediate_size", "n_inner"}:
        if cfg.intermediate_size == 4 * cfg.dim:
            out.intermediate_size = 4 * out.dim
    out.validate()
    return out


def _preset_table() -> dict[str, dict[str, Any]]:
    return {
        "gpt2": dict(dim=768, n_layers=12, n_heads=12),
        "gpt2-medium": dict(dim=1024, n_layers=24, n_heads=16),
        "gpt2-large": dict(dim=1280, n_layers=36, n_heads=20),
        "gpt2-xl": dict(dim=1600, n_layers=48, n_heads=25),
        # Test/demo size: the real GPT-2 vocabulary, ~3.4M parameters (mostly embeddings).
        "gpt2-tiny": dict(dim=64, n_layers=2, n_heads=4, max_position_embeddings=256),
    }


PRESET_NAMES: tuple[str, ...] = tuple(_preset_table())


def preset(name: str) -> GPT2Config:
    return preset_from_table(GPT2Config, _preset_table(), name, "GPT-2")
