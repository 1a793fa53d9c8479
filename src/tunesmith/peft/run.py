"""The `peft` config section applied to a training run (called from tunesmith.train.setup).

    base_dtype(cfg.peft, rt)        dtype to load the frozen base in (checks QLoRA's backend)
    check_layout(cfg.peft, ..)      QLoRA: NF4 weights split evenly over the FSDP2 shards
    apply_peft(model, cfg.peft, ..) freezing / LoRA / DoRA / QLoRA / Llama-Adapter / adapter from a checkpoint
    fill_peft(model, cfg.peft, ..)  the adapters' values: seeded init, or the loaded adapter
    save_final(...)                 OUTPUT/final = PEFT adapter (+ OUTPUT/final-merged)

Precision: under mixed precision the frozen base is stored in the autocast dtype (bf16), so
every step reads half the bytes and autocast has no fp32 copy to re-cast; adapters stay in the
parameter dtype (fp32), so their gradients and AdamW state are fp32. QLoRA stores the block
linear weights in NF4 and computes in bf16.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config import PeftConfig, RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.models.family import ModelConfig, ModelFamily
from tunesmith.models.io import build_model, save_pretrained
from tunesmith.models.registry import adaption_point
from tunesmith.peft import quant
from tunesmith.peft.adaption import adaption_modules, apply_adaption_prompt, init_adaption
from tunesmith.peft.adaption_io import copy_adaption_values, load_adaption, read_adaption, save_adaption
from tunesmith.peft.experts import expert_lora_modules
from tunesmith.peft.io import copy_adapter_values, load_adapter, read_adapter, save_adapter
from tunesmith.peft.lora import LoRASpec
from tunesmith.peft.targets import KeyAdapter
from tunesmith.peft.transform import (
    apply_freezing,
    apply_lora,
    cast_frozen,
    check_nf4_shards,
    count_params,
    float8_base,
    frozen_block_set,
    init_adapters,
    lora_modules,
    merge_lora,
    quantize_base,
)
from tunesmith.runtime import Runtime

log = logging.getLogger("tunesmith")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_dtype(pc: PeftConfig, rt: Runtime) -> torch.dtype:
    """dtype the (frozen) base model is loaded in. Raises now when QLoRA cannot run here."""
    if pc.method == "none":
        return rt.param_dtype
    if pc.method == "qlora":
        quant.require_nf4()
    if pc.base_dtype not in ("auto", "float8"):
        return _DTYPES[pc.base_dtype]
    if pc.method == "qlora" or pc.base_dtype == "float8":
        return torch.bfloat16  # NF4 dequantises to bf16 for compute; float8 is quantised from bf16
    return rt.autocast_dtype or rt.param_dtype


def _spec(pc: PeftConfig) -> LoRASpec:
    return LoRASpec(r=pc.r, alpha=pc.alpha, dropout=pc.dropout, rslora=pc.rslora, dora=pc.method == "dora")


def _load_checkpoint_adapter(model: nn.Module, adapter: KeyAdapter, pc: PeftConfig,
                             adapter_dtype: torch.dtype, values: bool) -> None:
    files = load_adapter(model, adapter, pc.from_checkpoint, adapter_dtype=adapter_dtype,
                         values=values)
    if pc.method == "dora" and not files.spec.dora:
        raise TunesmithError(f"peft.method=dora but {files.path} is a plain LoRA adapter; set peft.method=lora")
    if pc.method == "lora" and files.spec.dora:
        raise TunesmithError(f"peft.method=lora but {files.path} is a DoRA adapter; set peft.method=dora")
    log.info("peft: continuing adapter %s (r=%d, alpha=%g%s)", files.path, files.spec.r,
             files.spec.alpha, ", dora" if files.spec.dora else "")


def _freeze_adapters_in(model: nn.Module, blocks: set[int]) -> None:
    for name, mod in {**lora_modules(model), **expert_lora_modules(model)}.items():
        parts = name.split(".")
        if parts[0] == "layers" and int(parts[1]) in blocks:
            for p in mod.adapter_parameters().values():
                p.requires_grad_(False)


def apply_peft(model: nn.Module, pc: PeftConfig, rt: Runtime, family: ModelFamily,
               model_cfg: ModelConfig, *, on_meta: bool = False) -> nn.Module:
    """Apply the `peft` config section to a freshly built/loaded model, in place.

    method=none: only freezing. Otherwise (QLoRA: quantise the base first) adapters are added
    to the targets (or loaded from `from_checkpoint`), everything else is frozen, and frozen
    tensors are stored in base_dtype. Frozen blocks get no adapters. `on_meta`: the model is
    still on the meta device (sharded runs): only the structure changes, `fill_peft` gives the
    adapters their values after the shards are allocated.
    """
    blocks = frozen_block_set(model, pc.freeze_layers, pc.num_freeze_layers)
    if pc.method == "none":
        if blocks or pc.freeze_embeddings:
            n = apply_freezing(model, blocks, pc.freeze_embeddings)
            log.info("peft: froze %.2fM params (blocks %s%s)", n / 1e6, sorted(blocks) or "none",
                     ", embeddings" if pc.freeze_embeddings else "")
        return model
    if pc.method == "llama_adapter":
        return _apply_adaption(model, pc, rt, family, model_cfg, values=not on_meta)
    adapter = family.adapter(model_cfg)
    if pc.method == "qlora" and (not on_meta or family.load_fn is None):
        # NF4 storage now, before the adapters wrap the layers and before FSDP2 shards them.
        # On meta this is structure only: tunesmith's loader (`materialize`) quantises each
        # loaded or drawn weight as it fills it (`parallel.loading.copy_full_into`). Families
        # loaded through transformers (load_fn, one process) are quantised after loading.
        n = quantize_base(model, adapter)
        log.info("peft: %d weights stored in NF4 (block linears, MoE expert stacks)", n)
    elif not on_meta:  # on meta: `quantize_peft_base` once the loaded values exist
        quantize_peft_base(model, pc, family, model_cfg)
    if pc.from_checkpoint:
        _load_checkpoint_adapter(model, adapter, pc, rt.param_dtype, values=not on_meta)
        _freeze_adapters_in(model, blocks)
    else:
        apply_lora(model, adapter, _spec(pc), pc.target_modules, adapter_dtype=rt.param_dtype,
                   skip_blocks=blocks, parameters=pc.target_parameters)
    cast_frozen(model, base_dtype(pc, rt))
    trainable, total = count_params(model)
    n_experts = sum(len(m.lora) for m in expert_lora_modules(model).values())
    log.info("peft %s: %d layers%s with adapters, %.3fM trainable of %.2fM params (%.3f%%)",
             pc.method, len(lora_modules(model)),
             f" and {n_experts} stacked expert weights" if n_experts else "",
             trainable / 1e6, total / 1e6, 100 * trainable / max(total, 1))
    return model


def _apply_adaption(model: nn.Module, pc: PeftConfig, rt: Runtime, family: ModelFamily,
                    model_cfg: ModelConfig, *, values: bool) -> nn.Module:
    """peft.method=llama_adapter: prompts and gates in the top blocks (or those of
    `from_checkpoint`, with its own adapter_len / adapter_layers); the rest frozen."""
    point = adaption_point(model_cfg.model_type)
    if pc.from_checkpoint:
        files = load_adaption(model, point, family.adapter(model_cfg), pc.from_checkpoint,
                              dtype=rt.param_dtype, values=values)
        log.info("peft: continuing Llama-Adapter %s (adapter_len=%d, adapter_layers=%d)",
                 files.path, files.adapter_len, files.adapter_layers)
    else:
        apply_adaption_prompt(model, point, pc.adapter_len, pc.adapter_layers, dtype=rt.param_dtype)
    cast_frozen(model, base_dtype(pc, rt))
    trainable, total = count_params(model)
    log.info("peft llama_adapter: %d adapted attention layers, %.3fM trainable of %.2fM params "
             "(%.3f%%)", len(adaption_modules(model)), trainable / 1e6, total / 1e6,
             100 * trainable / max(total, 1))
    return model


def quantize_peft_base(model: nn.Module, pc: PeftConfig, family: ModelFamily,
                       model_cfg: ModelConfig) -> None:
    """The frozen base's storage format where it needs the loaded values: float8 e4m3 with
    row scales (`peft.base_dtype=float8`), and NF4 for the layers not NF4 yet (families loaded
    through transformers; `apply_peft` gives every other QLoRA base its NF4 structure on meta
    and `materialize` its values). LoRA layers already in place keep their adapters."""
    if pc.method == "qlora":
        n = quantize_base(model, family.adapter(model_cfg))
        if n:
            log.info("peft: %d weights stored in NF4 (block linears, MoE expert stacks)", n)
    elif pc.method != "none" and pc.base_dtype == "float8":
        n, dense = float8_base(model, family.adapter(model_cfg))
        log.info("peft: %d linear layers stored in float8 e4m3 (row scales)%s", n,
                 f"; {len(dense)} left dense (dims not multiples of 16)" if dense else "")


def check_layout(pc: PeftConfig, family: ModelFamily, model_cfg: ModelConfig, dp_shard: int) -> None:
    """QLoRA under FSDP2: every NF4 weight must split evenly over the `dp_shard` ranks.

    Checked on a meta-device model (nothing allocated), before any process group exists."""
    if pc.method != "qlora" or dp_shard <= 1:
        return
    check_nf4_shards(build_model(family, model_cfg, device="meta"), family.adapter(model_cfg), dp_shard)


def fill_peft(model: nn.Module, pc: PeftConfig, family: ModelFamily, model_cfg: ModelConfig,
              seed: int, *, loaded: bool) -> None:
    """The adapters' starting values: the `from_checkpoint` adapter (unless `loaded` already),
    else a seeded init identical in one process and in every sharded layout. Collective when
    the model is sharded: call on every rank."""
    if pc.method == "none":
        return
    if pc.method == "llama_adapter":
        if not pc.from_checkpoint:
            init_adaption(model, seed)
        elif not loaded:
            copy_adaption_values(model, adaption_point(model_cfg.model_type), family.adapter(model_cfg),
                                 read_adaption(pc.from_checkpoint))
        return
    if pc.from_checkpoint:
        if not loaded:
            copy_adapter_values(model, family.adapter(model_cfg), read_adapter(pc.from_checkpoint))
        return
    init_adapters(model, seed)


def _base_name(name: str) -> str:
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def save_final(model: nn.Module, family: ModelFamily, model_cfg: ModelConfig, cfg: RunConfig,
               out_dir: Path, tokenizer: Any) -> dict[str, str]:
    """Run end of an adapter run: the adapter (PEFT format, plus tokenizer) to OUTPUT/final
    and, with peft.save_merged (LoRA), the merged HF model to OUTPUT/final-merged (merged in
    place last, so do not train this model afterwards)."""
    final = out_dir / "final"
    if adaption_modules(model):
        save_adaption(model, adaption_point(model_cfg.model_type), family.adapter(model_cfg), final,
                      base_model=_base_name(cfg.model.name), tokenizer=tokenizer)
    else:
        save_adapter(model, family.adapter(model_cfg), final, base_model=_base_name(cfg.model.name),
                     tokenizer=tokenizer)
    out = {"final_model": str(final), "final_adapter": str(final)}
    if cfg.peft.save_merged:
        merge_lora(model)
        merged = out_dir / "final-merged"
        save_pretrained(model, family, model_cfg, merged, tokenizer=tokenizer)
        out["final_merged_model"] = str(merged)
    return out
