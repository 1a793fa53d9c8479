"""Optimizers and learning-rate schedules built from the config."""

from __future__ import annotations

import math

import torch
from torch import nn

from tunesmith.config.schema import OptimConfig, ScheduleConfig
from tunesmith.errors import TunesmithError
from tunesmith.optim_backward import attach_in_backward
from tunesmith.optim_lowmem import build_lowmem_optimizer, uses_torchao


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases and 1-D params are excluded, as is standard.

    Frozen parameters are left out entirely so the optimizer never allocates state for them.
    Tied weights appear once (named_parameters de-duplicates shared Parameters).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise TunesmithError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    opt = optimizer_for(param_groups(model, cfg.weight_decay), cfg, device)
    if cfg.in_backward:  # steps during backward; `opt` keeps the state (see optim_backward)
        attach_in_backward(model, opt, lambda groups: optimizer_for(groups, cfg, device))
    return opt


def optimizer_for(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """The configured optimizer over `groups` (param groups as `param_groups` makes them)."""
    param_dtype = next(p for g in groups for p in g["params"]).dtype
    if uses_torchao(cfg, param_dtype):  # 8-/4-bit moments, bf16 stochastic rounding
        return build_lowmem_optimizer(groups, cfg, param_dtype)
    if cfg.name == "adamw":
        # The fused kernel is one launch per step instead of several per param group: a clear
        # win on CUDA. On CPU it exists in recent torch but is not faster for small models.
        fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    if cfg.name == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise TunesmithError("optim.name=adafactor needs torch >= 2.5")
        # Adafactor's factored second moment keeps optimizer memory ~O(rows + cols) per matrix.
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    raise TunesmithError(f"unknown optimizer {cfg.name!r}")


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    if cfg.warmup_steps:
        return cfg.warmup_steps
    return int(math.ceil(cfg.warmup_ratio * total_steps))


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based: the step about to run)."""
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return (step + 1) / warm
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** (step // max(1, steps_per_epoch))
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    if cfg.name == "linear":
        decay = 1.0 - progress
    else:  # cosine
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    # LambdaLR stores only its step counter in state_dict, so resume restores it exactly;
    # the lambda itself is rebuilt from the config.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg, total_steps, steps_per_epoch)
    )
