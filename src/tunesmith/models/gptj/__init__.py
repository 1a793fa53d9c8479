"""GPT-J family (EleutherAI GPT-J-6B): parallel attention + MLP, interleaved partial rotary."""

from tunesmith.models.family import ModelFamily, preset_map
from tunesmith.models.gptj.adapter import GPTJStateDictAdapter
from tunesmith.models.gptj.config import PRESET_NAMES, GPTJConfig, apply_overrides, preset
from tunesmith.models.gptj.model import GPTJ

FAMILY = ModelFamily(
    name="gptj",
    model_types=("gptj",),
    config_cls=GPTJConfig,
    model_cls=GPTJ,
    adapter_cls=GPTJStateDictAdapter,
    presets=preset_map(PRESET_NAMES, preset),
    apply_overrides=apply_overrides,
)
