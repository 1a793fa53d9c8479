"""Low-memory AdamW from torchao: 8-/4-bit moments and bf16 weights with stochastic rounding.

    build_lowmem_optimizer(groups, cfg, device, param_dtype)   optim.name adamw8bit / adamw4bit,
                                                               or adamw + bf16_stochastic_round

Memory per trained parameter (AdamW keeps two moments):
    adamw (fp32 state)        8 bytes      (+ 4 for fp32 master weights under precision=bf16)
    adamw8bit                 ~2 bytes     one 8-bit code per value, one fp32 scale per 256
    adamw4bit                 ~1 byte      4-bit codes, one scale per 128
Tensors with fewer than 4096 values (norms, biases) keep plain state: torchao's rule, as in
bitsandbytes. With train.precision=bf16-pure the weights are bf16 and nothing else exists:
the 8B Llama is 16 GB of weights + 16 GB of bf16 gradients + 16 (8-bit) or 8 (4-bit) GB of state.

bf16 stochastic rounding: a bf16 weight near 1.0 has a spacing of 2^-7, so an update of
lr * ~1 = 1e-5 rounds back to the same weight every time and training stalls. torchao computes
the update in fp32 and rounds the result up or down at random with probability proportional to
the distance, so the expected weight is the fp32 one (no master copy). Default on for the
low-bit optimizers when the weights are bf16.

The step: torchao compiles its per-parameter update (one graph per parameter shape, built on
the first step). On CPU it runs eager instead (torch.compiler.set_stance("force_eager")):
compiling costs far more there than it saves at the sizes that fit on a CPU.

Checkpoints: the moments are torchao tensor subclasses (codes + scales); DCP saves and loads
them in place like any tensor, so resume restores them bit for bit. The learning rate is a
tensor in each param group (torchao's requirement, so a new lr does not recompile the step);
the LR scheduler writes into it in place.
"""

from __future__ import annotations

from typing import Any

import torch

from tunesmith.config.schema import OptimConfig
from tunesmith.errors import TunesmithError
from tunesmith.transforms.torchao_import import import_torchao

_CLASSES = {"adamw8bit": "AdamW8bit", "adamw4bit": "AdamW4bit", "adamw": "_AdamW"}


def stochastic_rounding(cfg: OptimConfig, param_dtype: torch.dtype) -> bool:
    """Whether bf16 updates round stochastically (explicit setting, else on for bf16 low-bit)."""
    if cfg.bf16_stochastic_round is not None:
        return cfg.bf16_stochastic_round
    return cfg.name in ("adamw8bit", "adamw4bit") and param_dtype == torch.bfloat16


def uses_torchao(cfg: OptimConfig, param_dtype: torch.dtype) -> bool:
    return cfg.name in ("adamw8bit", "adamw4bit") or (
        cfg.name == "adamw" and stochastic_rounding(cfg, param_dtype))


def _eager_on_cpu(base: type) -> type:
    """`base` whose step runs eager when its parameters live on the CPU."""

    class EagerOnCPU(base):  # type: ignore[misc, valid-type]
        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            first = next(p for g in self.param_groups for p in g["params"])
            if first.device.type == "cpu":
                with torch.compiler.set_stance("force_eager"):
                    return super().step(closure)
            return super().step(closure)

    EagerOnCPU.__name__ = EagerOnCPU.__qualname__ = base.__name__.lstrip("_")
    return EagerOnCPU


def build_lowmem_optimizer(groups: list[dict], cfg: OptimConfig, param_dtype: torch.dtype) -> torch.optim.Optimizer:
    """torchao's AdamW for `cfg` (see the module docstring); groups as from param_groups()."""
    ao = import_torchao("torchao.optim", f"optim.name={cfg.name}", tuple(_CLASSES.values()))
    rounding = stochastic_rounding(cfg, param_dtype)
    if rounding and param_dtype != torch.bfloat16:
        raise TunesmithError("optim.bf16_stochastic_round needs bf16 weights (train.precision=bf16-pure)")
    cls = _eager_on_cpu(getattr(ao, _CLASSES[cfg.name]))
    return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
               bf16_stochastic_round=rounding)
