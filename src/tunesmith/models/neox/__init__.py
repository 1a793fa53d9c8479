"""GPT-NeoX / Pythia family."""

from tunesmith.models.family import ModelFamily, preset_map
from tunesmith.models.neox.adapter import NeoXStateDictAdapter
from tunesmith.models.neox.config import PRESET_NAMES, NeoXConfig, apply_overrides, preset
from tunesmith.models.neox.model import NeoX

FAMILY = ModelFamily(
    name="gpt_neox",
    model_types=("gpt_neox",),
    config_cls=NeoXConfig,
    model_cls=NeoX,
    adapter_cls=NeoXStateDictAdapter,
    presets=preset_map(PRESET_NAMES, preset),
    apply_overrides=apply_overrides,
)
