"""Parameter-efficient fine-tuning: LoRA, DoRA, QLoRA, Llama-Adapter, layer freezing,
PEFT-format adapters.

Everything is a transform applied to an already built model from outside; model code is
untouched and module paths do not change. Typical use::

    model = build_model(family, cfg); load_pretrained(model, name, "cuda", torch.bfloat16)
    apply_lora(model, family.adapter(cfg), LoRASpec(r=16, alpha=32), "all-linear")
    ... train (the optimizer takes only requires_grad params) ...
    save_adapter(model, family.adapter(cfg), "out/adapter")     # loads in peft.PeftModel

For a trainer: `is_peft_model(model)` says whether checkpoints should hold only trainable
tensors, and `checkpoint_model_state(model)` returns the matching `ModelState`.
"""

from tunesmith.peft.adaption import adaption_modules, apply_adaption_prompt, init_adaption
from tunesmith.peft.adaption_io import load_adaption, save_adaption
from tunesmith.peft.experts import LoRAExperts, expert_lora_modules
from tunesmith.peft.io import AdapterFiles, adapter_state_dict, load_adapter, read_adapter, save_adapter
from tunesmith.peft.lora import LoRALinear, LoRASpec, NF4Linear, adapters_disabled, switchable_adapters
from tunesmith.peft.merge import merge_adapter
from tunesmith.peft.quant import nf4_available
from tunesmith.peft.run import apply_peft, base_dtype, fill_peft, quantize_peft_base, save_final
from tunesmith.peft.run import check_layout as check_peft_layout
from tunesmith.peft.targets import ALL_LINEAR, select_targets
from tunesmith.peft.transform import (
    apply_freezing,
    apply_lora,
    checkpoint_model_state,
    count_params,
    frozen_block_set,
    has_frozen_params,
    init_adapters,
    is_peft_model,
    lora_modules,
    merge_lora,
    quantize_base,
)

__all__ = [
    "ALL_LINEAR", "AdapterFiles", "LoRAExperts", "LoRALinear", "LoRASpec", "NF4Linear", "adapters_disabled", "adaption_modules",
    "adapter_state_dict", "apply_adaption_prompt", "apply_freezing", "apply_lora", "apply_peft", "base_dtype",
    "check_peft_layout", "checkpoint_model_state", "count_params", "expert_lora_modules", "fill_peft", "frozen_block_set",
    "has_frozen_params", "init_adaption", "init_adapters", "is_peft_model", "load_adaption", "load_adapter",
    "lora_modules", "merge_adapter", "merge_lora", "nf4_available", "quantize_base", "quantize_peft_base",
    "read_adapter", "save_adaption", "save_adapter", "save_final", "select_targets", "switchable_adapters",
]
