"""float8 training (`train.float8`): chosen `nn.Linear` layers become torchao `Float8Linear`.

    require_float8(device, option)        a CUDA GPU with float8 (SM >= 8.9), else TunesmithError
    float8_targets(model, recipe, ...)    which linear layers convert (the rule below)
    convert_float8(model, recipe, ...)    swap them in place; returns their names
    apply_float8(model, cfg)              the config's transform (called by parallelize first)
    float8_post_step(model, cfg)          per-optimizer-step hook for FSDP2 float8 all-gather
    float8_head_recipe(head)              the recipe the fused loss runs the LM head in, or None

Each converted layer keeps its `weight` Parameter (same name, dtype and values), so optimizer,
checkpoints and HF export are unchanged; only its three matmuls (output, input gradient, weight
gradient) run in float8 e4m3 with dynamic scales (per tensor for `tensorwise`, per row for
`rowwise`; `rowwise_with_gw_hp` keeps the weight gradient in bf16).

Order in the assembly: after PEFT's structural transforms (a LoRA layer is not an nn.Linear and
is never converted), before activation checkpointing, compile and FSDP2, so compile traces the
float8 casts into each block's graph and FSDP2 shards the `Float8Linear` weights.

The rule (`train.float8_filter`, `train.float8_skip`): a layer converts when
  * its name does not match a `float8_skip` glob (default `output`: the LM head, the most
    precision-sensitive matmul; opt in with e.g. `float8_skip: []`),
  * both its dims are multiples of 16 (the float8 GEMM's requirement), and
  * `auto` only: its shape is large enough to gain, per torchao's H100 thresholds for the recipe
    (tensorwise: not when in <= 4096 and out <= 1024; rowwise: not when out <= 2048, in <= 1024,
    or out <= 4096 and in <= 2048). Llama-3.2-1B, tensorwise: wq, wo, w1, w2, w3 convert, wk/wv
    (out 512) stay bf16.

The LM head is never a `Float8Linear`: the fused loss (objective/loss.py) reads its weight and
never calls its forward. A head the rule picks is marked instead (`float8_head_recipe`) and the
fused loss runs its three matmuls in float8 (objective/loss_float8.py). Only tensorwise: with
another recipe a picked head is refused (a one-line TunesmithError), as is a head with a bias
(it is folded into the matmul as an extra column, so D + 1 is not a multiple of 16).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.transforms.torchao_import import import_torchao

if TYPE_CHECKING:
    from tunesmith.config.schema import RunConfig

log = logging.getLogger("tunesmith")

# Compute capability from which GPUs have float8 tensor cores (Ada L4/L40 8.9, Hopper 9.0, ...).
MIN_CAPABILITY = (8, 9)
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
HEAD = "output"  # the LM head's module name in every family
HEAD_RECIPES = ("tensorwise",)  # what the fused loss's float8 head (objective/loss_float8.py) runs
_HEAD_MARK = "_tunesmith_float8_head"


def require_float8(device: torch.device, option: str) -> None:
    """Raise one clear TunesmithError unless `device` runs float8 matmuls."""
    if device.type != "cuda":
        raise TunesmithError(
            f"{option} needs a CUDA GPU with float8 (compute capability >= 8.9, e.g. L4, H100, "
            f"H200); this run is on {device.type}"
        )
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise TunesmithError(
            f"{option} needs a GPU with float8 (compute capability >= 8.9); "
            f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}"
        )


def check_float8_device(cfg: RunConfig, device: torch.device) -> None:
    """The config's float8 options (train.float8, peft.base_dtype=float8) against the device."""
    if cfg.train.float8 != "none":
        require_float8(device, f"train.float8={cfg.train.float8}")
        _float8_module()
    if cfg.peft.base_dtype == "float8":
        require_float8(device, "peft.base_dtype=float8")


def _float8_module():
    return import_torchao("torchao.float8", "train.float8",
                          ("convert_to_float8_training", "Float8LinearConfig", "_auto_filter_for_recipe"))


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)


def float8_targets(model: nn.Module, recipe: str, filter_mode: str = "auto",
                   skip: Sequence[str] = ("output",)) -> list[str]:
    """Names of the `nn.Linear` layers that train in float8 under the rule above."""
    if recipe not in RECIPES:
        raise TunesmithError(f"train.float8={recipe!r}: choose one of {', '.join(RECIPES)}")
    gains = None
    if filter_mode == "auto":
        # torchao has thresholds for tensorwise and rowwise; gw_hp runs rowwise GEMMs.
        gains = _float8_module()._auto_filter_for_recipe(
            "tensorwise" if recipe == "tensorwise" else "rowwise", filter_fqns=[])
    chosen = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or _skipped(name, skip):
            continue
        out_f, in_f = mod.weight.shape
        if out_f % 16 or in_f % 16:
            continue
        if gains is None or gains(mod, name):
            chosen.append(name)
    return chosen


def convert_float8(model: nn.Module, recipe: str, filter_mode: str = "auto",
                   skip: Sequence[str] = ("output",), *, all_gather: bool = False,
                   emulate: bool = False) -> list[str]:
    """Swap the chosen linear layers for torchao Float8Linear in place; returns their names.

    `emulate` runs the float8 casts with bf16/fp32 matmuls (torchao's CPU test mode)."""
    ao = _float8_module()
    chosen = set(float8_targets(model, recipe, filter_mode, skip))
    if not chosen:
        raise TunesmithError(
            f"train.float8={recipe}: no linear layer qualifies (train.float8_filter={filter_mode}, "
            f"float8_skip={list(skip)}); use float8_filter=all or train.float8=none"
        )
    if HEAD in chosen:  # the fused loss runs it in float8 (module docstring); torchao does not
        _mark_head(getattr(model, HEAD), recipe)
    layers = chosen - {HEAD}
    if layers:
        config = ao.Float8LinearConfig.from_recipe_name(recipe)
        if all_gather or emulate:
            config = dataclasses.replace(config, enable_fsdp_float8_all_gather=all_gather, emulate=emulate)
        ao.convert_to_float8_training(model, module_filter_fn=lambda _m, fqn: fqn in layers, config=config)
    return sorted(chosen)


def _mark_head(head: nn.Module, recipe: str) -> None:
    if recipe not in HEAD_RECIPES:
        raise TunesmithError(
            f"train.float8={recipe}: the LM head ('{HEAD}') trains in float8 only with "
            f"tensorwise; keep '{HEAD}' in train.float8_skip or use train.float8=tensorwise")
    if getattr(head, "bias", None) is not None:
        raise TunesmithError(
            f"train.float8: the LM head ('{HEAD}') has a bias, which the fused loss folds in as "
            f"an extra column (not a multiple of 16 for float8); keep '{HEAD}' in train.float8_skip")
    setattr(head, _HEAD_MARK, recipe)


def float8_head_recipe(head: nn.Module) -> str | None:
    """The float8 recipe the fused loss runs `head` in (set by `convert_float8`), else None."""
    return getattr(head, _HEAD_MARK, None)


def apply_float8(model: nn.Module, cfg: RunConfig, *, distributed: bool = False) -> list[str]:
    """The config's float8 transform (no-op for train.float8=none); logs what converted."""
    tc = cfg.train
    if tc.float8 == "none":
        return []
    names = convert_float8(model, tc.float8, tc.float8_filter, tc.float8_skip,
                           all_gather=tc.float8_all_gather and distributed)
    linears = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    log.info("float8 %s: %d of %d linear layers train in float8 (%s)%s", tc.float8, len(names),
             linears, _summary(names),
             f"; the LM head ({HEAD}) in the fused loss" if HEAD in names else "")
    return names


def _summary(names: list[str]) -> str:
    """Distinct leaf names, e.g. 'w1, w2, w3, wo, wq' (the layer index dropped)."""
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))


def float8_post_step(model: nn.Module, cfg: RunConfig, *, distributed: bool) -> Callable[[], None] | None:
    """FSDP2 float8 all-gather: after each optimizer step, one fused amax over all float8 weights
    gives the next step's scales (instead of one all-reduce per layer). None when not needed."""
    tc = cfg.train
    if not (tc.float8_all_gather and distributed and tc.float8 == "tensorwise"):
        return None
    precompute = import_torchao("torchao.float8", "train.float8_all_gather",
                                ("precompute_float8_dynamic_scale_for_fsdp",)).precompute_float8_dynamic_scale_for_fsdp
    return lambda: precompute(model)
