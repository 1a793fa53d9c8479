"""The family registry and model-spec resolution.

Families are discovered, not listed: every sub-package of `tunesmith.models` that exports a
`FAMILY` descriptor (`tunesmith.models.family.ModelFamily`) is registered under each of its HF
`model_type`s. Any other model_type transformers knows runs through the generic wrapper
(`tunesmith.models.hf_generic`). Adding a family is adding a folder (docs/architecture.md).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import pkgutil
from pathlib import Path
from typing import Any

from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.hf import io as hfio
from tunesmith.models import hf_generic
from tunesmith.models.family import AdaptionPoint, ModelConfig, ModelFamily

GENERIC_FAMILY = hf_generic.FAMILY


@functools.cache
def families() -> dict[str, ModelFamily]:
    """{HF model_type: family} for every family folder under tunesmith/models."""
    import tunesmith.models as pkg

    found: dict[str, ModelFamily] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.ispkg:
            continue
        family = getattr(importlib.import_module(f"{pkg.__name__}.{info.name}"), "FAMILY", None)
        if not isinstance(family, ModelFamily):
            continue
        for model_type in family.model_types:
            if model_type in found:
                raise RuntimeError(f"model_type {model_type!r} is claimed by families "
                                   f"{found[model_type].name!r} and {family.name!r}")
            found[model_type] = family
    return found


def get_family(model_type: str) -> ModelFamily:
    """The family serving HF `model_type` (the generic wrapper for other transformers types)."""
    known = families()
    if model_type not in known and model_type and hf_generic.known_model_type(model_type):
        return GENERIC_FAMILY
    if model_type not in known:
        raise TunesmithError(
            f"unsupported model_type {model_type!r}; known: {', '.join(sorted(known))}"
        )
    return known[model_type]


def family_of(model: nn.Module) -> ModelFamily:
    """The family of a built model (read from its config, never from its class)."""
    return get_family(model.cfg.model_type)  # type: ignore[union-attr]


def adaption_point(model_type: str) -> AdaptionPoint:
    """Where Llama-Adapter attaches for `model_type`; a one-line error for types without one."""
    family = get_family(model_type)
    if family.adaption is None or model_type not in family.adaption.peft_model_types:
        served = sorted(t for t, f in families().items()
                        if f.adaption is not None and t in f.adaption.peft_model_types)
        raise TunesmithError(f"peft.method=llama_adapter is not available for model_type "
                             f"{model_type!r} (peft's adaption_prompt: {', '.join(served)})")
    return family.adaption


def all_presets() -> dict[str, ModelFamily]:
    """{preset name: family} over every registered family."""
    unique = {id(fam): fam for fam in families().values()}.values()
    return {p: fam for fam in unique for p in fam.presets}


def is_preset(name: str) -> bool:
    """True when `name` is a named size (e.g. `llama3-8b`), not a path or hub id."""
    return name in all_presets()


def usable_positions(cfg: ModelConfig) -> int:
    """Longest sequence a config's position table/RoPE range covers (RoBERTa: 2 rows less)."""
    return int(getattr(cfg, "max_positions", cfg.max_position_embeddings))


def _not_a_model(p: Path) -> str:
    """Why directory `p` (no config.json) is not a model, naming what to pass instead: new
    users hand eval/generate/train a run directory or a training checkpoint."""
    what = f"model directory {p} has no config.json"
    if (p / "manifest.json").is_file():
        return (f"{what}: it is a training checkpoint; write a model from it with "
                f"`tunesmith export {p} --out DIR`, or use the run's final/")
    if (p / "final" / "config.json").is_file() or (p / "final" / "adapter_config.json").is_file():
        return f"{what}: it is a run directory; its model is {p / 'final'}"
    if (p / "checkpoints").is_dir():
        return (f"{what}: it is a run directory without final/; write a model from its newest "
                f"checkpoint with `tunesmith export {p} --out DIR`")
    if (p / "adapter_config.json").is_file():
        return (f"{what}: it is a PEFT adapter; name its base model (adapter_config.json's "
                "base_model_name_or_path) and load the adapter with peft.from_checkpoint")
    return what


def _local_config_path(source: str) -> Path | None:
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix != ".json":
            raise TunesmithError(f"model {p} is a file, not a model directory or its config.json")
        return p
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise TunesmithError(_not_a_model(p))
        return p / "config.json"
    return None


def resolve_model_config(
    source: str, overrides: dict[str, Any] | None = None
) -> tuple[ModelFamily, ModelConfig]:
    """Config from a preset name, a local dir / config.json path, or a hub id, plus overrides."""
    presets = all_presets()
    local = _local_config_path(source)
    if local is None and source in presets:
        family = presets[source]
        return family, family.apply_overrides(family.presets[source](), overrides)
    if local is None:
        neither = (f"model {source!r} is neither a preset ({', '.join(sorted(presets))}), "
                   "a local path, nor reachable on the HF hub")
        if not hfio.looks_like_hub_id(source):
            close = difflib.get_close_matches(source, list(presets), n=1)
            raise TunesmithError(neither + (f"; did you mean {close[0]!r}?" if close else ""))
        try:
            local = hfio.download_hub_file(source, "config.json")
        except TunesmithError as e:
            raise TunesmithError(f"{neither} ({e})") from None
    hf_cfg = hfio.read_json(local)
    hfio.check_config_types(local, hf_cfg)
    family = get_family(str(hf_cfg.get("model_type", "")))
    try:
        cfg = family.config_cls.from_hf(hf_cfg)
    except (ValueError, TypeError, KeyError) as e:  # a field the type check above does not know
        raise TunesmithError(f"{local}: cannot read the model config ({e})") from None
    return family, family.apply_overrides(cfg, overrides)
