"""MoE family (Mixtral, Qwen3-MoE): the Llama decoder with top-k routed SwiGLU experts."""

from tunesmith.models.family import ModelFamily, preset_map
from tunesmith.models.moe import parallel_plan
from tunesmith.models.moe.adapter import MoEStateDictAdapter
from tunesmith.models.moe.config import PRESET_NAMES, MoEConfig, apply_overrides, preset
from tunesmith.models.moe.model import MoE

FAMILY = ModelFamily(
    name="moe",
    model_types=("mixtral", "qwen3_moe"),
    config_cls=MoEConfig,
    model_cls=MoE,
    adapter_cls=MoEStateDictAdapter,
    presets=preset_map(PRESET_NAMES, preset),
    apply_overrides=apply_overrides,
    # Tensor parallelism splits the experts between the TP ranks (parallel_plan says why not
    # their intermediate dim); context parallelism rings the Llama attention, and the
    # load-balancing loss sums its routing counts over the cp ranks (objective/router_aux.py);
    # no Llama-Adapter (peft's adaption_prompt does not serve these types).
    tp_plan=parallel_plan,
    expert_parallel=parallel_plan.expert_parallel,
    context_parallel=True,
    adaption=None,
    lora_note="the experts and the router of these MoE models are not linear layers (stacked 3-D "
              "expert weights, as in transformers 5): target the experts with "
              "peft.target_parameters (experts.gate_up_proj, experts.down_proj); the router "
              "takes no adapter",
)
