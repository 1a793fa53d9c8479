"""BERT / RoBERTa family: masked-LM encoders (task=mlm)."""

from tunesmith.models.bert.adapter import BertStateDictAdapter
from tunesmith.models.bert.config import PRESET_NAMES, BertConfig, apply_overrides, preset
from tunesmith.models.bert.model import BertMLM
from tunesmith.models.family import ModelFamily, preset_map

FAMILY = ModelFamily(
    name="bert",
    model_types=("bert", "roberta"),
    config_cls=BertConfig,
    model_cls=BertMLM,
    adapter_cls=BertStateDictAdapter,
    presets=preset_map(PRESET_NAMES, preset),
    apply_overrides=apply_overrides,
    kind="masked",
)
