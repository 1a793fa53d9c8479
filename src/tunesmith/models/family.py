"""`ModelFamily`: the one descriptor each family folder exports as `FAMILY`.

A family owns its capabilities: the registry (`tunesmith.models.registry`) discovers the
descriptors, and every other layer asks the descriptor instead of testing model classes or
keeping its own tables of model types:

    parallel.layout   family.tp_plan is not None   (tensor parallelism)
                      family.expert_parallel       (expert parallelism, MoE)
                      family.shardable             (FSDP2 / DDP, sharded loading)
    data / train      family.kind                  ("causal" decoders, "masked" encoders)
    models.io         family.load_fn / save_fn     (families loading through transformers)
    peft              family.adaption              (Llama-Adapter's attachment point)
                      family.lora_note             (why some weights take no LoRA: MoE experts)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

# A family's config dataclass (LlamaConfig, GPT2Config, BertConfig, ...). They share the
# attributes the model layer reads: model_type, vocab_size, max_position_embeddings,
# tie_word_embeddings, bos/eos/pad_token_id, validate(), to_hf(), from_hf().
ModelConfig = Any


class TPPlan(Protocol):
    """A family's tensor-parallel plan (DTensor `parallelize_module` styles by submodule name)."""

    def block_plan(self) -> dict[str, Any]: ...

    def top_plan(self) -> dict[str, Any]: ...

    def check_tp_shape(self, model: nn.Module, tp: int) -> None: ...


@dataclass(frozen=True)
class AdaptionPoint:
    """Where Llama-Adapter (peft's `adaption_prompt`) attaches in a family's blocks.

    attention: the block's attention submodule name. It must call `forward(x, cos, sin, ...)`
        with x [B, T, D] and cos/sin the block's rotary tables, and own `wq`, `wk`, `wv`, `wo`
        linears and `head_dim`; the transform recomputes the rotated queries from these.
    rotate: the family's rotary embedding applied to q [B, H, T, hd] (cos/sin as given).
    peft_model_types: HF model types peft's adaption_prompt supports in this family (adapters
        for other types of the family could not be loaded by peft, so they are refused).
    """

    attention: str
    rotate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    peft_model_types: tuple[str, ...]


@dataclass(frozen=True)
class ModelFamily:
    """Everything needed to build, load, save and parallelise one architecture family.

    kind: "causal" (decoder LMs: clm/sft tasks, generation) or "masked" (encoders: mlm task).
    tp_plan: the tensor-parallel plan, None when the family has none (tp=1 only).
    expert_parallel: splits the experts over an expert-parallel mesh (parallel.ep); None: ep=1.
    shardable: native modules (`layers`, `tok_embeddings`, `output`) that FSDP2 / DDP wrap and
        the sharded loader streams into; False for the generic transformers wrapper.
    context_parallel: the model's attention goes through `models.attention.sdpa_attention` with
        an `AttnSpec` from its caller and takes explicit `positions`, so context parallelism can
        put ring attention in its place (`parallel.cp`).
    adaption: where Llama-Adapter attaches (`peft.method=llama_adapter`); None: not offered.
    lora_note: appended to the error for LoRA target names that match no linear layer, when
        the family has weights LoRA does not adapt (the MoE family's experts and router).
    """

    name: str
    model_types: tuple[str, ...]  # HF `model_type` values served by this family
    config_cls: type
    model_cls: type[nn.Module]
    adapter_cls: type
    presets: Mapping[str, Callable[[], ModelConfig]]
    apply_overrides: Callable[[ModelConfig, dict[str, Any] | None], ModelConfig]
    kind: str = "causal"
    tp_plan: TPPlan | None = None
    # Expert parallelism: (model, 1-D ep mesh, gradient scale) -> the expert modules it split
    # Shard(0) over the mesh (parallel.apply gives them FSDP2 units of their own).
    expert_parallel: Callable[[nn.Module, Any, float], list[nn.Module]] | None = None
    shardable: bool = True
    context_parallel: bool = False
    adaption: AdaptionPoint | None = None
    lora_note: str | None = None
    # Families that load/save through transformers itself (the generic fallback).
    load_fn: Callable[..., nn.Module] | None = None
    save_fn: Callable[[nn.Module, Path], None] | None = None

    def adapter(self, cfg: ModelConfig) -> Any:
        """The family's state-dict adapter (native <-> HF tensor names) for `cfg`."""
        return self.adapter_cls(cfg)


def preset_map(names: tuple[str, ...], make: Callable[[str], ModelConfig]
               ) -> dict[str, Callable[[], ModelConfig]]:
    """{preset name: zero-argument factory} for a family's `presets` field."""
    return {name: (lambda n=name: make(n)) for name in names}
