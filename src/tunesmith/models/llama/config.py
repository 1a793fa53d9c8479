"""Configuration of the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) and its HF `config.json`
mapping.

The four HF model types share one architecture; they differ only in config keys, in which
attention projections carry a bias, and in Qwen3's per-head q/k RMSNorm:
    llama:   `attention_bias` applies to q, k, v *and* o projections
    mistral: never any attention bias (`sliding_window` is accepted but ignored: we always
             run full causal attention, identical to HF for sequences <= sliding_window)
    qwen2:   q, k, v always have a bias, o never does (HF hard-codes this)
    qwen3:   `attention_bias` applies to q, k, v and o (as llama), and q and k go through an
             RMSNorm over head_dim (`qk_norm`) before RoPE; sliding-window layers are refused
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from tunesmith.errors import TunesmithError
from tunesmith.models.common import COMMON_HF_KEYS, DECODER_HF_KEYS, SHAPE_ALIASES

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# HF config.json key -> our field name. Used by `from_hf` and to accept HF names in overrides.
HF_KEY_MAP: dict[str, str] = {
    **COMMON_HF_KEYS,
    **DECODER_HF_KEYS,
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "attention_bias": "attention_bias",
    "mlp_bias": "mlp_bias",
}


@dataclass
class LlamaConfig:
    """Architecture hyper-parameters.

    `head_dim` 0 means dim // n_heads; `n_kv_heads` 0 means n_heads (MHA).
    """

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v projections
    # Bias on the o projection; HF llama ties it to attention_bias, qwen2 never has one.
    attention_out_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    initializer_range: float = 0.02
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)  # unused HF keys, kept for the record
    # The model types this config class accepts (the MoE family's subclass has its own).
    MODEL_TYPES: ClassVar[tuple[str, ...]] = MODEL_TYPES

    def __post_init__(self) -> None:
        if not self.n_kv_heads:
            self.n_kv_heads = self.n_heads
        if not self.head_dim:
            self.head_dim = self.dim // max(self.n_heads, 1)
        self.validate()

    def validate(self) -> None:
        """Raise TunesmithError on shapes the model cannot build."""
        where = f"model config ({self.model_type})"
        if self.model_type not in self.MODEL_TYPES:
            raise TunesmithError(f"{where}: unknown model_type {self.model_type!r}; "
                                 f"known: {', '.join(self.MODEL_TYPES)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "intermediate_size"):
            if int(getattr(self, name)) <= 0:
                raise TunesmithError(f"{where}: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise TunesmithError(
                f"{where}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads})"
            )
        if not self.rope_theta > 0:
            raise TunesmithError(f"{where}: rope_theta must be positive, got {self.rope_theta}")
        if self.head_dim % 2:
            raise TunesmithError(f"{where}: head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling, where)

    @property
    def qk_norm(self) -> bool:
        """RMSNorm over head_dim on q and k before RoPE (Qwen3, Qwen3-MoE)."""
        return self.model_type in ("qwen3", "qwen3_moe")

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Build from a HF `config.json` dict (transformers 4.x or 5.x layout)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise TunesmithError(
                f"config.json: model_type {model_type!r} is not a Llama-family model; "
                f"known: {', '.join(MODEL_TYPES)}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise TunesmithError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
        kw: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in hf.items():
            ours = HF_KEY_MAP.get(key)
            if ours is not None and key not in ("rope_theta", "rope_scaling"):
                kw[ours] = value
            elif key not in ("rope_parameters", "rope_theta", "rope_scaling", "architectures"):
                extra[key] = value
        kw["rope_theta"], kw["rope_scaling"] = _read_rope(hf)
        kw["torch_dtype"] = str(kw.get("torch_dtype") or "float32").replace("torch.", "")
        kw["head_dim"] = kw.get("head_dim") or 0
        kw["n_kv_heads"] = kw.get("n_kv_heads") or 0
        if model_type == "qwen3" and hf.get("use_sliding_window"):
            raise TunesmithError("config.json: qwen3 with use_sliding_window=true is not supported "
                                 "(tunesmith runs full causal attention in every layer)")
        if model_type in ("llama", "qwen3"):
            kw["attention_out_bias"] = bool(kw.get("attention_bias", False))
        elif model_type == "mistral":
            kw["attention_bias"] = kw["attention_out_bias"] = False
        else:  # qwen2
            kw["attention_bias"], kw["attention_out_bias"] = True, False
        kw.setdefault("bos_token_id", None)
        kw.setdefault("eos_token_id", None)
        return cls(**kw, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        """HF `config.json` dict in the layout transformers 5.x writes (`rope_parameters`)."""
        self.validate()
        mt = self.model_type
        self._check_hf_expressible()
        rope: dict[str, Any] = {"rope_theta": float(self.rope_theta), "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling)
            rope["rope_type"] = "llama3"
        out = self.hf_decoder_fields(_ARCHITECTURES[mt], rope)
        if mt == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias, pretraining_tp=1)
        elif mt == "qwen3":
            out.update(attention_bias=self.attention_bias, use_sliding_window=False, sliding_window=None,
                       max_window_layers=self.n_layers, layer_types=["full_attention"] * self.n_layers)
        elif mt == "mistral":
            out["sliding_window"] = None
        else:
            # HF Qwen2Config has no head_dim field (the model reads it with getattr and a
            # hidden_size // heads default); write it only when it differs from that default.
            if self.head_dim == self.dim // self.n_heads:
                del out["head_dim"]
            out.update(use_sliding_window=False, sliding_window=None,
                       max_window_layers=self.n_layers)
        return out

    def hf_decoder_fields(self, architecture: str, rope: dict[str, Any]) -> dict[str, Any]:
        """The `config.json` fields every Llama-style decoder type writes (the MoE family's too)."""
        return {
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.norm_eps,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": rope,
            "attention_dropout": 0.0,
            "dtype": self.torch_dtype,
        }

    def _check_hf_expressible(self) -> None:
        mt = self.model_type
        bias = (self.attention_bias, self.attention_out_bias)
        expected = {"llama": (self.attention_bias, self.attention_bias),
                    "qwen3": (self.attention_bias, self.attention_bias),
                    "mistral": (False, False), "qwen2": (True, False)}[mt]
        if bias != expected or (self.mlp_bias and mt != "llama"):
            raise TunesmithError(
                f"model config: HF {mt!r} cannot express attention_bias={bias[0]}, "
                f"attention_out_bias={bias[1]}, mlp_bias={self.mlp_bias}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def n_matmul_params_per_layer(self) -> int:
        """Weights of the 7 linear layers of one block (biases and norms excluded)."""
        q = self.dim * self.n_heads * self.head_dim
        kv = 2 * self.dim * self.n_kv_heads * self.head_dim
        o = self.n_heads * self.head_dim * self.dim
        return q + kv + o + 3 * self.dim * self.intermediate_size

    @property
    def block_matmul_params(self) -> int:
        """Matmul weights one token goes through in all blocks (the MoE config counts only the
        experts a token is routed to): the N of `flops_per_token`, without the head."""
        return self.n_layers * self.n_matmul_params_per_layer


def _check_rope_scaling(rs: dict[str, Any], where: str) -> None:
    rtype = rs.get("rope_type", rs.get("type"))
    if rtype != "llama3":
        raise TunesmithError(
            f"{where}: rope scaling type {rtype!r} is not supported; "
            f"known: {', '.join(_ROPE_TYPES)}"
        )
    missing = [k for k in _LLAMA3_KEYS if k not in rs]
    if missing:
        raise TunesmithError(f"{where}: llama3 rope scaling is missing {', '.join(missing)}")


def _read_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, llama3 scaling dict or None) from either HF layout.

    transformers 5: {"rope_parameters": {"rope_type", "rope_theta", ...scaling keys}}
    transformers 4: top-level "rope_theta" plus optional "rope_scaling" {"rope_type"|"type", ...}
    """
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    merged = {**legacy, **params}
    theta = merged.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rtype = merged.pop("rope_type", merged.pop("type", "default"))
    if rtype in (None, "default"):
        return float(theta), None
    if rtype != "llama3":
        raise TunesmithError(
            f"config.json: rope type {rtype!r} is not supported; known: {', '.join(_ROPE_TYPES)}"
        )
    scaling: dict[str, Any] = {"rope_type": "llama3"}
    for key in _LLAMA3_KEYS:
        if key in merged:
            scaling[key] = merged[key]
    # HF falls back to max_position_embeddings when the original context length is absent.
    scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    _check_rope_scaling(scaling, "config.json")
    return float(theta), scaling


# ---------------------------------------------------------------------- overrides
def apply_overrides(cfg: LlamaConfig, overrides: dict[str, Any] | None,
                    key_map: dict[str, str] = HF_KEY_MAP) -> LlamaConfig:
    """Return a copy of `cfg` with overrides applied; keys may be our names or HF names
    (`key_map`: the HF names of `cfg`'s class; the MoE family passes its own).

    When dim or n_heads change and head_dim was derived (dim // n_heads) and is not itself
    overridden, head_dim is re-derived so "make it wider" does the obvious thing.
    """
    if not overrides:
        return copy.deepcopy(cfg)
    names = tuple(f.name for f in fields(cfg) if f.name != "extra")
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        # GPT-2 names (n_embd, n_head, n_layer, ...) are accepted too.
        ours = key if key in names else key_map.get(key) or SHAPE_ALIASES.get(key)
        if ours is None:
            valid = sorted(set(names) | set(key_map) | set(SHAPE_ALIASES))
            close = difflib.get_close_matches(key, valid, n=1)
            hint = (f"; did you mean {close[0]!r}?" if close
                    else f"; valid keys: {', '.join(names)}")
            raise TunesmithError(f"model override: unknown key {key!r}{hint}")
        changes[ours] = copy.deepcopy(value)
    derived_head = cfg.head_dim == cfg.dim // cfg.n_heads
    if derived_head and "head_dim" not in changes and ({"dim", "n_heads"} & changes.keys()):
        changes["head_dim"] = 0
    if "n_heads" in changes and "n_kv_heads" not in changes and cfg.n_kv_heads == cfg.n_heads:
        changes["n_kv_heads"] = 0  # stay multi-head when the base was MHA
    return replace(copy.deepcopy(cfg), **changes)


# ---------------------------------------------------------------------- presets
def _llama3_scaling(factor: float, original: int = 8192) -> dict[str, Any]:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": original}


def _preset_table() -> dict[str, dict[str, Any]]:
    l2 = dict(vocab_size=32000, max_position_embeddings=4096, norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2)
    l3 = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5, bos_token_id=128000,
              eos_token_id=128001, max_position_embeddings=8192, torch_dtype="bfloat16")
    l31 = dict(l3, max_position_embeddings=131072, rope_scaling=_llama3_scaling(8.0))
    l32 = dict(l3, max_position_embeddings=131072, rope_scaling=_llama3_scaling(32.0),
               tie_word_embeddings=True)
    # Qwen3: head_dim 128 and 8 KV heads at every size; eos is <|im_end|> as in the HF configs.
    qwen3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, n_kv_heads=8,
                 rope_theta=1000000.0, norm_eps=1e-6, max_position_embeddings=40960,
                 bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")
    qwen = dict(model_type="qwen2", attention_bias=True, rope_theta=1000000.0, norm_eps=1e-6,
                max_position_embeddings=131072, bos_token_id=151643, eos_token_id=151643,
                torch_dtype="bfloat16")
    return {
        # Test/demo model: llama3-style (GQA, llama3 rope scaling, tied), ~156K params. The
        # scaling's original context (256) is below max positions (HF warns otherwise) and puts
        # the 8 rotary frequencies in all three llama3 bands (kept / smoothed / divided).
        "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     intermediate_size=256, rope_theta=500000.0, max_position_embeddings=2048,
                     rope_scaling=_llama3_scaling(8.0, original=256), tie_word_embeddings=True,
                     bos_token_id=1, eos_token_id=2),
        "llama2-7b": dict(l2, dim=4096, n_layers=32, n_heads=32, intermediate_size=11008,
                          torch_dtype="float16"),
        "llama2-13b": dict(l2, dim=5120, n_layers=40, n_heads=40, intermediate_size=13824,
                           torch_dtype="float16"),
        "llama3-8b": dict(l3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                          intermediate_size=14336),
        "llama3.1-8b": dict(l31, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                            intermediate_size=14336),
        "llama3.2-1b": dict(l32, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                            intermediate_size=8192),
        "llama3.2-3b": dict(l32, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128,
                            intermediate_size=8192),
        "llama3-70b": dict(l3, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                           intermediate_size=28672),
        # Mistral-7B-v0.1 shapes (its 4096-token sliding window is not modelled).
        "mistral-7b": dict(model_type="mistral", vocab_size=32000, dim=4096, n_layers=32,
                           n_heads=32, n_kv_heads=8, intermediate_size=14336, norm_eps=1e-5,
                           max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
                           torch_dtype="bfloat16"),
        "qwen2-0.5b": dict(qwen, vocab_size=151936, dim=896, n_layers=24, n_heads=14,
                           n_kv_heads=2, intermediate_size=4864, tie_word_embeddings=True),
        "qwen2-7b": dict(qwen, vocab_size=152064, dim=3584, n_layers=28, n_heads=28,
                         n_kv_heads=4, intermediate_size=18944),
        "qwen3-0.6b": dict(qwen3, dim=1024, n_layers=28, n_heads=16, intermediate_size=3072,
                           tie_word_embeddings=True),
        "qwen3-4b": dict(qwen3, dim=2560, n_layers=36, n_heads=32, intermediate_size=9728,
                         tie_word_embeddings=True),
        "qwen3-8b": dict(qwen3, dim=4096, n_layers=36, n_heads=32, intermediate_size=12288),
    }


PRESET_NAMES: tuple[str, ...] = tuple(_preset_table())


def preset(name: str) -> LlamaConfig:
    """A named preset config (fresh object each call)."""
    table = _preset_table()
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TunesmithError(
            f"unknown model preset {name!r}{hint}; known: {', '.join(table)}"
        )
    kw = table[name]
    if kw.get("model_type") == "qwen2":
        kw = dict(kw, attention_out_bias=False)
    return LlamaConfig(**kw)

