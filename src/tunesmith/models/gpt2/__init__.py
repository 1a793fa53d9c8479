"""GPT-2 family."""

from tunesmith.models.family import ModelFamily, preset_map
from tunesmith.models.gpt2.adapter import GPT2StateDictAdapter
from tunesmith.models.gpt2.config import PRESET_NAMES, GPT2Config, apply_overrides, preset
from tunesmith.models.gpt2.model import GPT2

FAMILY = ModelFamily(
    name="gpt2",
    model_types=("gpt2",),
    config_cls=GPT2Config,
    model_cls=GPT2,
    adapter_cls=GPT2StateDictAdapter,
    presets=preset_map(PRESET_NAMES, preset),
    apply_overrides=apply_overrides,
)
