"""Configuration of the Gemma 3 text models (HF `gemma3_text`, `Gemma3ForCausalLM`) and its HF
`config.json` mapping.

Gemma 3 interleaves sliding-window layers (local RoPE base, `sliding_window` keys back) with
full-attention layers (global RoPE base, optional linear RoPE scaling): `layer_types` names
each layer's kind; when absent it is derived from `sliding_window_pattern` (every 6th layer
full, as HF does). Both HF layouts of the RoPE settings are read:
    transformers 5: rope_parameters = {"full_attention": {"rope_type", "rope_theta", "factor"?},
                                       "sliding_attention": {"rope_type", "rope_theta"}}
    transformers 4: rope_theta (global), rope_local_base_freq (local), rope_scaling (global)
and the 5.x layout is written. Logit soft-capping (Gemma 2) is refused: Gemma 3 has none.
An image+text `gemma3` config is read through its `text_config` (`gemma.multimodal`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.models.common import (
    COMMON_HF_KEYS,
    DECODER_HF_KEYS,
    SHAPE_ALIASES,
    check_positive,
    override_fields,
    preset_from_table,
    split_hf_keys,
)
from tunesmith.models.gemma import multimodal
from tunesmith.models.llama.config import LlamaConfig

MODEL_TYPE = multimodal.TEXT_TYPE  # "gemma3_text"
MULTIMODAL_TYPE = multimodal.MULTIMODAL_TYPE  # "gemma3": its text tower is read (text_config)
SLIDING, FULL = "sliding_attention", "full_attention"
_ACTIVATION = "gelu_pytorch_tanh"
_ROPE_TYPES = ("default", "linear")  # linear: only on full-attention layers, as Gemma 3 4B-27B

HF_KEY_MAP: dict[str, str] = {
    **COMMON_HF_KEYS,
    **DECODER_HF_KEYS,
    "query_pre_attn_scalar": "query_pre_attn_scalar",
    "sliding_window": "sliding_window",
    "sliding_window_pattern": "sliding_window_pattern",
    "layer_types": "layer_types",
    "attention_bias": "attention_bias",
    "hidden_activation": "hidden_activation",
    "rope_theta": "rope_theta",
    "rope_local_base_freq": "rope_local_base_freq",
}
# Read by `_read_rope` or checked by `_refuse_unsupported`, not copied as they are.
_SPECIAL_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq",
                 "architectures", "final_logit_softcapping", "attn_logit_softcapping",
                 "use_bidirectional_attention", "hidden_act")


@dataclass
class GemmaConfig:
    """Architecture hyper-parameters of a Gemma 3 text model (defaults: gemma-3-1b)."""

    vocab_size: int = 262144
    dim: int = 1152
    n_layers: int = 26
    n_heads: int = 4
    n_kv_heads: int = 1
    head_dim: int = 256
    intermediate_size: int = 6912
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # full-attention layers
    rope_local_base_freq: float = 10_000.0  # sliding-window layers
    rope_scaling_factor: float = 1.0  # linear RoPE scaling of the full-attention layers
    query_pre_attn_scalar: float = 256  # attention scores are scaled by its -1/2 power
    sliding_window: int = 512
    sliding_window_pattern: int = 6  # layer i is full when (i + 1) % pattern == 0
    layer_types: list[str] | None = None  # None: from sliding_window_pattern
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q, k, v and o (HF applies it to all four)
    hidden_activation: str = _ACTIVATION
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0
    model_type: str = MODEL_TYPE
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"
    # Read from an image+text `gemma3` checkpoint: its weights carry language-model prefixes
    # and a vision tower the adapter skips. Saves are plain `gemma3_text` all the same.
    multimodal_source: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # unused HF keys, kept for the record

    def __post_init__(self) -> None:
        self.validate()

    @property
    def types(self) -> list[str]:
        """Each layer's attention kind: "sliding_attention" or "full_attention"."""
        if self.layer_types is not None:
            return list(self.layer_types)
        return pattern_types(self.n_layers, self.sliding_window_pattern)

    def validate(self) -> None:
        """Raise TunesmithError on shapes the model cannot build."""
        where = f"model config ({self.model_type})"
        if self.model_type != MODEL_TYPE:
            raise TunesmithError(f"{where}: model_type must be {MODEL_TYPE!r}")
        check_positive(self, where, ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                                     "head_dim", "intermediate_size", "sliding_window",
                                     "sliding_window_pattern", "max_position_embeddings"))
        if self.n_heads % self.n_kv_heads:
            raise TunesmithError(f"{where}: n_heads ({self.n_heads}) must be a multiple of "
                                 f"n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise TunesmithError(f"{where}: head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rope_theta", "rope_local_base_freq", "rope_scaling_factor",
                     "query_pre_attn_scalar", "norm_eps"):
            if not float(getattr(self, name)) > 0:
                raise TunesmithError(f"{where}: {name} must be positive, got {getattr(self, name)}")
        if self.hidden_activation != _ACTIVATION:
            raise TunesmithError(f"{where}: hidden_activation {self.hidden_activation!r} is not "
                                 f"supported (Gemma 3 uses {_ACTIVATION!r})")
        types = self.types
        bad = sorted({t for t in types if t not in (SLIDING, FULL)})
        if bad or len(types) != self.n_layers:
            wrong = f"unknown kinds {bad}" if bad else f"{len(types)} entries"
            raise TunesmithError(f"{where}: layer_types must list {self.n_layers} entries (one per "
                                 f"layer) of {SLIDING!r} / {FULL!r}, got {wrong}")

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GemmaConfig:
        """Build from a HF `config.json` dict (transformers 4.x or 5.x layout); an image+text
        `gemma3` one gives its text model."""
        if hf.get("model_type") == MULTIMODAL_TYPE:
            return replace(cls.from_hf(multimodal.text_config(hf)), multimodal_source=True)
        _refuse_unsupported(hf)
        kw, extra = split_hf_keys(hf, HF_KEY_MAP, skip=_SPECIAL_KEYS)
        kw["rope_theta"], kw["rope_local_base_freq"], kw["rope_scaling_factor"] = _read_rope(hf)
        kw.setdefault("hidden_activation", hf.get("hidden_act", _ACTIVATION))
        if kw.get("layer_types") is not None:
            kw["layer_types"] = list(kw["layer_types"])
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kw.setdefault(key, None)
        return cls(**kw, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        """HF `config.json` dict in the layout transformers 5.x writes (`rope_parameters`)."""
        self.validate()
        full: dict[str, Any] = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.rope_scaling_factor != 1.0:
            full.update(rope_type="linear", factor=float(self.rope_scaling_factor))
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_activation": self.hidden_activation,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.norm_eps,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": {
                FULL: full,
                SLIDING: {"rope_type": "default", "rope_theta": float(self.rope_local_base_freq)},
            },
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window,
            "layer_types": self.types,
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "use_bidirectional_attention": False,
            "dtype": self.torch_dtype,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # Weights of the 7 linear layers of one block, and of all blocks (what `flops_per_token`,
    # shared with Llama, counts): the same projections as Llama's.
    n_matmul_params_per_layer = LlamaConfig.n_matmul_params_per_layer
    block_matmul_params = LlamaConfig.block_matmul_params


def pattern_types(n_layers: int, pattern: int) -> list[str]:
    """HF's derivation of layer_types: layer i is full attention when (i + 1) % pattern == 0."""
    return [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]


def _refuse_unsupported(hf: dict[str, Any]) -> None:
    model_type = hf.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise TunesmithError(f"config.json: model_type {model_type!r} is not {MODEL_TYPE!r}")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise TunesmithError(f"config.json: {key}={hf[key]} is not supported (Gemma 3 has "
                                 "no logit soft-capping; tunesmith implements none)")
    if hf.get("use_bidirectional_attention"):
        raise TunesmithError("config.json: use_bidirectional_attention=true (an embedding "
                             "model) is not supported; tunesmith trains causal Gemma 3 only")


def _rope_entry(params: dict[str, Any], kind: str) -> tuple[float, float]:
    """(theta, linear factor) of one layer kind's RoPE settings; one line for other types."""
    rtype = params.get("rope_type", params.get("type", "default"))
    if rtype not in _ROPE_TYPES or (rtype == "linear" and kind == SLIDING):
        allowed = "default" if kind == SLIDING else ", ".join(_ROPE_TYPES)
        raise TunesmithError(f"config.json: rope type {rtype!r} on {kind} layers is not "
                             f"supported; known: {allowed}")
    factor = float(params.get("factor", 1.0)) if rtype == "linear" else 1.0
    return float(params["rope_theta"]), factor


def _read_rope(hf: dict[str, Any]) -> tuple[float, float, float]:
    """(global theta, local theta, linear factor of the full layers) from either HF layout,
    merged as transformers 5 does: legacy `rope_scaling` updates the full-attention entry, the
    legacy thetas fill in what `rope_parameters` leaves out."""
    params = copy.deepcopy(hf.get("rope_parameters") or {})
    stray = sorted(set(params) - {FULL, SLIDING})
    if stray:
        raise TunesmithError(f"config.json: rope_parameters for Gemma 3 must be keyed by "
                             f"{FULL!r} / {SLIDING!r}, got {', '.join(stray)}")
    full = dict(params.get(FULL) or {})
    full.update(hf.get("rope_scaling") or {})
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local = dict(params.get(SLIDING) or {})
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    theta, factor = _rope_entry(full, FULL)
    local_theta, _ = _rope_entry(local, SLIDING)
    return theta, local_theta, factor


# ---------------------------------------------------------------------- overrides
def apply_overrides(cfg: GemmaConfig, overrides: dict[str, Any] | None) -> GemmaConfig:
    """Copy of `cfg` with overrides (our names, HF names or GPT-2's). layer_types that follow
    the pattern are re-derived for the new depth when n_layers changes; explicit ones that do
    not must be overridden along with it."""
    keys = {HF_KEY_MAP.get(k) or SHAPE_ALIASES.get(k) or k for k in overrides or {}}
    if "n_layers" in keys and "layer_types" not in keys and cfg.layer_types is not None \
            and cfg.layer_types == pattern_types(cfg.n_layers, cfg.sliding_window_pattern):
        cfg = replace(cfg, layer_types=None)
    return override_fields(cfg, overrides, HF_KEY_MAP)


# ---------------------------------------------------------------------- presets
def _preset_table() -> dict[str, dict[str, Any]]:
    # From the published config.json files on the HF hub: google/gemma-3-1b-pt (text model) and
    # the `text_config` of google/gemma-3-{4b,12b,27b}-pt (values they leave out are
    # Gemma3TextConfig defaults: head_dim 256, 131072 positions, vocab 262208 with the image
    # tokens). All: every 6th layer full attention, RoPE bases 1e6 (full) / 1e4 (local); 4B-27B:
    # window 1024 and linear RoPE scaling 8 on the full layers. The larger ones are text towers
    # (shapes for training from scratch); their image+text checkpoints load by path as well.
    return {
        # Test/demo model (~100K parameters): sliding and full layers alternate, window 16.
        "gemma3-tiny": dict(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2,
                            head_dim=16, intermediate_size=128, sliding_window=16,
                            sliding_window_pattern=2, max_position_embeddings=2048,
                            query_pre_attn_scalar=16, torch_dtype="float32"),
        "gemma3-1b": dict(vocab_size=262144, dim=1152, n_layers=26, n_heads=4, n_kv_heads=1,
                          head_dim=256, intermediate_size=6912, sliding_window=512,
                          max_position_embeddings=32768, query_pre_attn_scalar=256),
        "gemma3-4b": dict(vocab_size=262208, dim=2560, n_layers=34, n_heads=8, n_kv_heads=4,
                          head_dim=256, intermediate_size=10240, sliding_window=1024,
                          max_position_embeddings=131072, query_pre_attn_scalar=256,
                          rope_scaling_factor=8.0),
        "gemma3-12b": dict(vocab_size=262208, dim=3840, n_layers=48, n_heads=16, n_kv_heads=8,
                           head_dim=256, intermediate_size=15360, sliding_window=1024,
                           max_position_embeddings=131072, query_pre_attn_scalar=256,
                           rope_scaling_factor=8.0),
        "gemma3-27b": dict(vocab_size=262208, dim=5376, n_layers=62, n_heads=32, n_kv_heads=16,
                           head_dim=128, intermediate_size=21504, sliding_window=1024,
                           max_position_embeddings=131072, query_pre_attn_scalar=168,
                           rope_scaling_factor=8.0),
    }


PRESET_NAMES: tuple[str, ...] = tuple(_preset_table())


def preset(name: str) -> GemmaConfig:
    """A named preset config (fresh object each call)."""
    return preset_from_table(GemmaConfig, _preset_table(), name, "Gemma 3")
