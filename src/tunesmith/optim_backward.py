"""Optimizer step fused into backward (`optim.in_backward`): each parameter is updated as soon
as its gradient is complete, and that gradient is freed at once, so the gradients of the whole
model never exist together. Full fine-tuning of the 8B Llama in bf16 saves the 16 GB that its
gradients would otherwise take at the end of backward.

The optimizer that `build_optimizer` made stays the one and only holder of state and param
groups. The trainer's `optimizer.step()`, the LR scheduler and checkpoints (DCP
`get_optimizer_state_dict`) all see that optimizer unchanged, so a checkpoint has the same
format and resume is exact. Each parameter also gets a one-parameter optimizer of the same kind.
A post-accumulate-grad hook runs that optimizer's step on the shared state, copying the group's
current hyperparameters (lr from the scheduler) first. By the time the trainer calls
`optimizer.step()`, every gradient is None, so that call updates nothing.

The hook also records each gradient's norm for the logged grad norm and the NaN guard. The
constraints come from applying updates during backward, and the config enforces them:
- no global-norm clipping, because the norm is known only after every update was applied;
- no gradient accumulation;
- nan_policy=halt, because an applied update cannot be skipped;
- no fp16 grad scaler;
- one process only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tunesmith.errors import TunesmithError

Factory = Callable[[list[dict]], torch.optim.Optimizer]


class InBackward:
    """Hooks that step `optimizer`'s parameters one by one during backward (see module doc)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, factory: Factory) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise TunesmithError("optim.in_backward runs in one process only (no FSDP/DDP/TP)")
        self.optimizer = optimizer
        named = list(model.named_parameters())
        names = {id(p): n for n, p in named}
        pos = {id(p): i for i, (_, p) in enumerate(named)}
        # (one-parameter optimizer, index of the parameter's group): by index, because the
        # main optimizer's load_state_dict (resume) replaces its group dicts.
        self._subs: dict[int, tuple[torch.optim.Optimizer, int]] = {}
        self._norms: dict[int, torch.Tensor] = {}
        self._order: list[tuple[str, int]] = []  # (name, id) in the model's parameter order
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                hyper = {k: v for k, v in group.items() if k != "params"}
                self._subs[id(p)] = (factory([{"params": [p], **hyper}]), gi)
                self._order.append((names.get(id(p), "?"), id(p)))
                p.register_post_accumulate_grad_hook(self._step)
        self._order.sort(key=lambda item: pos.get(item[1], 0))

    @torch.no_grad()
    def _step(self, p: torch.Tensor) -> None:
        sub, gi = self._subs[id(p)]
        sub_group = sub.param_groups[0]
        for k, v in self.optimizer.param_groups[gi].items():
            if k != "params":
                sub_group[k] = v  # the scheduler's current lr (a tensor for torchao: shared)
        # One state dict for both: checkpoints save and load the main optimizer's, and its
        # load_state_dict replaces the dict object, so re-point it every time.
        sub.state = self.optimizer.state
        self._norms[id(p)] = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        sub.step()
        p.grad = None

    def grad_norms(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(global grad norm, per-parameter norms [P], names) of the last backward; resets."""
        got = [(n, self._norms[i]) for n, i in self._order if i in self._norms]
        self._norms.clear()
        if not got:
            zero = torch.zeros(())
            return zero, zero.reshape(0), []
        per = torch.stack([t for _, t in got])  # [P] fp32
        return torch.linalg.vector_norm(per), per, [n for n, _ in got]


def attach_in_backward(model: nn.Module, optimizer: torch.optim.Optimizer, factory: Factory) -> None:
    """Make `optimizer` step during backward; the trainer finds the hooks at `optimizer.in_backward`."""
    optimizer.in_backward = InBackward(model, optimizer, factory)  # type: ignore[attr-defined]
