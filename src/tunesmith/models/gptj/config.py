"""GPT-J configuration and its HF `config.json` mapping.

GPT-J (EleutherAI/gpt-j-6b) is a pre-LayerNorm decoder whose attention and MLP both read the
one LayerNorm of a block and are added in parallel (x + attn(ln x) + mlp(ln x)). Attention
projections have no bias, the MLP and the untied LM head have biases. Rotary embeddings cover
only the first `rotary_dim` dims of each head, in GPT-J's interleaved layout (pairs (0,1),
(2,3), ... rotate together), with base 10000 (fixed in GPT-J). Dropout is not modelled;
`resid_pdrop` and friends stay in `extra` and are written back on save.
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

_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu")

HF_KEY_MAP: dict[str, str] = {
    "vocab_size": "vocab_size",
    "n_embd": "dim",
    "n_layer": "n_layers",
    "n_head": "n_heads",
    "n_inner": "intermediate_size",
    "n_positions": "max_position_embeddings",
    "rotary_dim": "rotary_dim",
    "layer_norm_epsilon": "norm_eps",
    "activation_function": "activation",
    **COMMON_HF_KEYS,
}


@dataclass
class GPTJConfig:
    """`intermediate_size` 0 means 4 * dim (HF `n_inner: null`); `rotary_dim` 0 means the
    whole head (HF `rotary_dim: null`)."""

    vocab_size: int = 50400
    dim: int = 4096
    n_layers: int = 28
    n_heads: int = 16
    intermediate_size: int = 0
    max_position_embeddings: int = 2048
    rotary_dim: int = 64
    norm_eps: float = 1e-5
    activation: str = "gelu_new"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    model_type: str = "gptj"
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

    @property
    def rope_dims(self) -> int:
        """Rotated dims per head (the whole head when rotary_dim is 0/null)."""
        return self.rotary_dim or self.head_dim

    def validate(self) -> None:
        where = "model config (gptj)"
        check_positive(self, where, ("vocab_size", "dim", "n_layers", "n_heads",
                                     "intermediate_size", "max_position_embeddings"))
        if self.dim % self.n_heads:
            raise TunesmithError(
                f"{where}: n_embd ({self.dim}) must be a multiple of n_head ({self.n_heads})")
        if self.rotary_dim < 0 or self.rope_dims > self.head_dim or self.rope_dims % 2:
            raise TunesmithError(
                f"{where}: rotary_dim={self.rotary_dim} must be even and at most the head dim "
                f"({self.head_dim})")
        if self.activation not in _ACTIVATIONS:
            raise TunesmithError(f"{where}: activation_function {self.activation!r} is not "
                                 f"supported; known: {', '.join(_ACTIVATIONS)}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPTJConfig:
        if hf.get("model_type", "gptj") != "gptj":
            raise TunesmithError(f"config.json: model_type {hf.get('model_type')!r} is not gptj")
        kw, extra = split_hf_keys(hf, HF_KEY_MAP, skip=("architectures",))
        kw["intermediate_size"] = kw.get("intermediate_size") or 0
        kw["rotary_dim"] = kw.get("rotary_dim") or 0
        kw.setdefault("tie_word_embeddings", False)
        return cls(**kw, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        self.validate()
        out: dict[str, Any] = {k: v for k, v in self.extra.items() if k != "transformers_version"}
        out.update({
            "architectures": ["GPTJForCausalLM"],
            "model_type": "gptj",
            "vocab_size": self.vocab_size,
            "n_embd": self.dim,
            "n_layer": self.n_layers,
            "n_head": self.n_heads,
            "n_inner": None if self.intermediate_size == 4 * self.dim else self.intermediate_size,
            "n_positions": self.max_position_embeddings,
            "rotary_dim": self.rope_dims,  # transformers 5 wants an int, not null
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


def apply_overrides(cfg: GPTJConfig, overrides: dict[str, Any] | None) -> GPTJConfig:
    """Overrides by our names, GPT-J HF names or the shared aliases. "Make it wider" keeps the
    4x MLP unless the MLP width itself is overridden."""
    out = override_fields(cfg, overrides, HF_KEY_MAP)
    keys = set(overrides or {})
    if keys & {"dim", "n_embd", "hidden_size"} and not keys & {"intermediate_size", "n_inner"}:
        if cfg.intermediate_size == 4 * cfg.dim:
            out.intermediate_size = 4 * out.dim
    out.validate()
    return out


def _preset_table() -> dict[str, dict[str, Any]]:
    return {
        "gpt-j-6b": dict(),  # EleutherAI/gpt-j-6b: 28 x 4096, 16 heads, rotary_dim 64
        # Test size: the real vocabulary and rotary layout (rotary_dim < head_dim), ~6.6M params.
        "gptj-tiny": dict(dim=64, n_layers=2, n_heads=4, rotary_dim=8,
                          max_position_embeddings=512),
    }


PRESET_NAMES: tuple[str, ...] = tuple(_preset_table())


def preset(name: str) -> GPTJConfig:
    return preset_from_table(GPTJConfig, _preset_table(), name, "GPT-J")
