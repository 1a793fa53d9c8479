"""Gemma 3 text family (HF gemma3_text): sliding-window and full-attention layers."""

from tunesmith.models.family import ModelFamily, preset_map
from tunesmith.models.gemma import parallel_plan
from tunesmith.models.gemma.adapter import GemmaStateDictAdapter
from tunesmith.models.gemma.config import (
    MODEL_TYPE,
    MULTIMODAL_TYPE,
    PRESET_NAMES,
    GemmaConfig,
    apply_overrides,
    preset,
)
from tunesmith.models.gemma.model import Gemma

FAMILY = ModelFamily(
    name="gemma",
    # `gemma3` (image+text): its text tower, read through `text_config` (gemma.multimodal).
    model_types=(MODEL_TYPE, MULTIMODAL_TYPE),
    config_cls=GemmaConfig,
    model_cls=Gemma,
    adapter_cls=GemmaStateDictAdapter,
    presets=preset_map(PRESET_NAMES, preset),
    apply_overrides=apply_overrides,
    tp_plan=parallel_plan,
    # Ring attention masks the sliding layers' window and takes Gemma's score scale
    # (query_pre_attn_scalar); peft's adaption_prompt has no Gemma support.
    context_parallel=True,
    adaption=None,
)
