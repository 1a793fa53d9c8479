"""Helpers shared by the model families' configs: overrides with HF / GPT-2 key names."""

from __future__ import annotations

import copy
import difflib
from dataclasses import fields, replace
from typing import Any, TypeVar

from tunesmith.errors import TunesmithError

C = TypeVar("C")

# Architecture names every family understands in `model.overrides`, whatever its own HF names:
# GPT-2's (n_embd=1024, n_head=16, n_layer=48) and the Llama/BERT-style HF names.
SHAPE_ALIASES: dict[str, str] = {
    "n_embd": "dim",
    "n_head": "n_heads",
    "n_layer": "n_layers",
    "n_positions": "max_position_embeddings",
    "n_ctx": "max_position_embeddings",
    "n_inner": "intermediate_size",
    "hidden_size": "dim",
    "num_attention_heads": "n_heads",
    "num_hidden_layers": "n_layers",
    "layer_norm_epsilon": "norm_eps",
    "layer_norm_eps": "norm_eps",
}


def override_fields(
    cfg: C, overrides: dict[str, Any] | None, key_map: dict[str, str]
) -> C:
    """Copy of dataclass `cfg` with overrides applied; keys are field names, `key_map` keys
    (the family's HF names) or `SHAPE_ALIASES`. Unknown keys raise with the closest match."""
    if not overrides:
        return copy.deepcopy(cfg)
    names = tuple(f.name for f in fields(cfg) if f.name != "extra")  # type: ignore[arg-type]
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        ours = key if key in names else key_map.get(key) or SHAPE_ALIASES.get(key)
        if ours is None or ours not in names:
            valid = sorted(set(names) | set(key_map) | set(SHAPE_ALIASES))
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise TunesmithError(f"model override: unknown key {key!r}{hint}")
        changes[ours] = copy.deepcopy(value)
    return replace(copy.deepcopy(cfg), **changes)  # type: ignore[type-var]


def check_positive(cfg: Any, where: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise TunesmithError(f"{where}: {name} must be a positive integer, got {value!r}")


def split_hf_keys(
    hf: dict[str, Any], key_map: dict[str, str], skip: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(our kwargs, unused keys kept as `extra`) from a HF config dict."""
    kw: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in hf.items():
        ours = key_map.get(key)
        if ours is not None:
            kw[ours] = value
        elif key not in skip:
            extra[key] = value
    if "torch_dtype" in kw:
        kw["torch_dtype"] = str(kw["torch_dtype"] or "float32").replace("torch.", "")
    return kw, extra


# HF config keys that mean the same field in every family (each family adds its own shape keys).
COMMON_HF_KEYS: dict[str, str] = {
    "initializer_range": "initializer_range",
    "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "model_type": "model_type",
    "torch_dtype": "torch_dtype",
    "dtype": "torch_dtype",
}

# The shape keys of the Llama-style decoders (Llama family, MoE, Gemma 3): HF name -> our field.
DECODER_HF_KEYS: dict[str, str] = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "rms_norm_eps": "norm_eps",
    "max_position_embeddings": "max_position_embeddings",
}


def preset_from_table(cls: type[C], table: dict[str, dict[str, Any]], name: str, kind: str) -> C:
    """`cls(**table[name])`, or one clear error naming the closest preset of this family."""
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TunesmithError(f"unknown {kind} preset {name!r}{hint}; known: {', '.join(table)}")
    return cls(**table[name])
