"""Llama family (Llama 2/3, Mistral, Qwen2, Qwen3): the only family with a tensor-parallel plan."""

from tunesmith.models.family import AdaptionPoint, ModelFamily, preset_map
from tunesmith.models.llama import parallel_plan
from tunesmith.models.llama.adapter import LlamaStateDictAdapter
from tunesmith.models.llama.config import PRESET_NAMES, LlamaConfig, apply_overrides, preset
from tunesmith.models.llama.model import Llama
from tunesmith.models.rope import apply_rope

FAMILY = ModelFamily(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    config_cls=LlamaConfig,
    model_cls=Llama,
    adapter_cls=LlamaStateDictAdapter,
    presets=preset_map(PRESET_NAMES, preset),
    apply_overrides=apply_overrides,
    tp_plan=parallel_plan,
    context_parallel=True,
    # peft's adaption_prompt serves llama and mistral (not qwen2)
    adaption=AdaptionPoint("attention", apply_rope, ("llama", "mistral")),
)
