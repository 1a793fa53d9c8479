"""The model spec: what to build, resolved once from the run config.

`resolve_spec` reads the model's config (preset, local dir or hub), applies the overrides, finds
where weights come from and loads the tokenizer, checking it fits the vocabulary; the tokenizer's
special-token ids replace the config's where they disagree (`special_tokens`). Every later
step reads this one object; nothing resolves the model config again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.build.special_tokens import align_special_tokens
from tunesmith.config import RunConfig
from tunesmith.data import load_tokenizer
from tunesmith.errors import TunesmithError
from tunesmith.models.family import ModelConfig, ModelFamily
from tunesmith.models.registry import is_preset, resolve_model_config, usable_positions


@dataclass(frozen=True)
class ModelSpec:
    """family + config (overrides applied), the weight source, and the tokenizer."""

    family: ModelFamily
    model_cfg: ModelConfig
    source: str  # model.name: a preset, a local dir / config.json, or a hub id
    pretrained: bool  # weights are streamed from `source` (else a seeded init)
    tokenizer: Any  # a transformers tokenizer (None only for specs built without one)
    tokenizer_source: str

    @property
    def max_positions(self) -> int:
        """Longest sequence the model's position range covers (data is cut to it)."""
        return usable_positions(self.model_cfg)


def has_weights(source: str) -> bool:
    """True when `source` can supply pretrained weights (a checkpoint dir, or a hub id)."""
    p = Path(source)
    if p.is_dir():
        return any(p.glob("*.safetensors")) or any(p.glob("*.bin")) or (
            p / "model.safetensors.index.json"
        ).exists()
    if p.exists():
        return False  # a bare config.json
    return not is_preset(source) and "/" in source  # hub id "org/name"


def resolve_model(cfg: RunConfig) -> tuple[ModelFamily, ModelConfig]:
    """(family, model config) for the run: the one place `model.name` + overrides resolve."""
    return resolve_model_config(cfg.model.name, cfg.model.overrides)


def resolve_spec(cfg: RunConfig, *, with_tokenizer: bool = True) -> ModelSpec:
    """The spec of the run's model. `with_tokenizer=False` (benchmarks on synthetic token ids)
    leaves the tokenizer out."""
    mc = cfg.model
    family, model_cfg = resolve_model(cfg)
    pretrained = has_weights(mc.name) and not mc.from_scratch
    if not with_tokenizer:
        return ModelSpec(family, model_cfg, mc.name, pretrained, None, "")
    tok_source = mc.tokenizer or (mc.name if not is_preset(mc.name) else None)
    if tok_source is None:
        raise TunesmithError(
            f"model.name={mc.name!r} is a preset without a tokenizer: set model.tokenizer"
        )
    tokenizer = load_tokenizer(tok_source, trust_remote_code=mc.trust_remote_code)
    if len(tokenizer) > model_cfg.vocab_size:
        raise TunesmithError(
            f"tokenizer {tok_source} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model_cfg.vocab_size}; set model.overrides.vocab_size"
        )
    if family.kind == "causal":  # encoders' pad id shapes their position ids: left alone
        model_cfg = align_special_tokens(model_cfg, tokenizer, tok_source)
    return ModelSpec(family, model_cfg, mc.name, pretrained, tokenizer, tok_source)
