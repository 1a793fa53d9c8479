"""Stateful wrappers: each turns one piece of training state into a DCP-savable state dict.

The trainer hands `CheckpointManager` one mapping `app_state: dict[str, Stateful]`. Every
wrapper has `state_dict()` (also used as the *template* DCP loads into in place, so it must
have the right keys and tensor shapes on a freshly built object) and `load_state_dict(sd)`.

Model and optimizer go through `torch.distributed.checkpoint.state_dict`, which keys state by
parameter FQN and returns DTensors under FSDP2, so the same checkpoint reshards across world
sizes. Without a process group those helpers fall back to plain tensors.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tunesmith.errors import TunesmithError

__all__ = [
    "Stateful",
    "ModelState",
    "OptimizerState",
    "RNGState",
    "ObjectState",
    "process_rank",
]


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def process_rank() -> int:
    """This process's global rank; 0 when no process group is running."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable through dicts/lists/tuples (DTensor: global size)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class ModelState:
    """Model parameters and persistent buffers, keyed by FQN.

    Tied weights (e.g. `output.weight is tok_embeddings.weight`) appear under both names;
    loading copies into the shared tensor twice, so the tie (same storage) survives.
    `trainable_only=True` keeps only params with `requires_grad` plus persistent buffers:
    what a LoRA/partial fine-tune checkpoint needs, the frozen base comes from its own file.
    """

    def __init__(self, model: nn.Module, *, trainable_only: bool = False) -> None:
        self.model = model
        self.trainable_only = trainable_only

    def _options(self, *, strict: bool = True) -> StateDictOptions:
        return StateDictOptions(ignore_frozen_params=self.trainable_only, strict=strict)

    def state_dict(self) -> dict[str, Any]:
        sd = get_model_state_dict(self.model, options=self._options())
        if self.trainable_only:
            # torch drops frozen params found by named_parameters(), which lists a tied weight
            # once: the second name (a frozen tied LM head) would slip through otherwise.
            for name, p in self.model.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    sd.pop(name, None)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A trainable-only checkpoint lacks the frozen keys by design, so load non-strict and
        # then insist on exactly what this wrapper would have saved.
        expected = set(self.state_dict())
        missing = sorted(expected - set(state_dict))
        if missing:
            raise TunesmithError(f"model state is missing {len(missing)} key(s), first: {missing[0]}")
        set_model_state_dict(self.model, state_dict, options=self._options(strict=not self.trainable_only))

    def estimate_bytes(self) -> int:
        return _tensor_bytes(self.state_dict())


class OptimizerState:
    """Optimizer state (exp_avg, step, ...) and param groups, keyed by parameter FQN.

    `get_optimizer_state_dict` initialises the state of a fresh optimizer by running a zero-lr
    step, which would give a live run `step=1` it never took. We undo that on the live
    optimizer and record `initialized` so loading a step-0 checkpoint is exact too.
    """

    _INIT_KEY = "initialized"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        was_initialized = bool(self.optimizer.state)
        sd = dict(get_optimizer_state_dict(self.model, self.optimizer))
        if not was_initialized:
            self.optimizer.state.clear()
        sd[self._INIT_KEY] = was_initialized
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        initialized = bool(sd.pop(self._INIT_KEY, True))
        set_optimizer_state_dict(self.model, self.optimizer, sd)
        if not initialized:
            self.optimizer.state.clear()

    def estimate_bytes(self) -> int:
        # Side-effect free: a fresh optimizer has no state yet, so assume Adam-like (two
        # tensors per trainable param) instead of materialising it.
        if self.optimizer.state:
            return _tensor_bytes(list(self.optimizer.state.values()))
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        return 2 * sum(p.numel() * p.element_size() for p in params)


class RNGState:
    """Python `random`, numpy's global generator, torch CPU and every CUDA device generator.

    Torch generator states are uint8 tensors, saved as tensors. Python/numpy states are
    tuples, which DCP stores as one pickled object each. All of it sits under `rank_{r}`:
    ranks draw different streams, and DCP would otherwise deduplicate same-named entries
    and keep a single rank's copy.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = {str(i): s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        return {f"rank_{process_rank()}": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        key = f"rank_{process_rank()}"
        if key not in state_dict:
            raise TunesmithError(f"RNG state has no entry for {key} (saved with a different world size?)")
        state = state_dict[key]
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"].cpu())
        cuda = state.get("cuda") or {}
        if cuda and torch.cuda.is_available():
            n = min(len(cuda), torch.cuda.device_count())
            torch.cuda.set_rng_state_all([cuda[str(i)].cpu() for i in range(n)])


class ObjectState:
    """Small host-side state (trainer progress, loader, LR scheduler, GradScaler) via callables.

    The getter's value is serialised to *one* bytes blob. DCP only loads keys present in the
    load-time template, so a plain dict would silently drop keys a fresh object does not have
    yet (an empty loader state, a lazily created GradScaler scale); a single opaque leaf
    always round-trips whole. Tensors inside are pickled whole, not resharded: keep them small.
    `per_rank=True` stores one blob per rank (e.g. each rank's data-loader position).
    """

    def __init__(
        self,
        getter: Callable[[], Any],
        setter: Callable[[Any], Any],
        *,
        per_rank: bool = False,
    ) -> None:
        self.getter = getter
        self.setter = setter
        self.per_rank = per_rank

    def _key(self) -> str:
        return f"rank_{process_rank()}" if self.per_rank else "data"

    def state_dict(self) -> dict[str, Any]:
        buf = io.BytesIO()
        torch.save(self.getter(), buf)
        return {self._key(): buf.getvalue()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        key = self._key()
        blob = state_dict.get(key)
        if not isinstance(blob, (bytes, bytearray)):
            raise TunesmithError(f"object state has no '{key}' blob (saved with a different world size?)")
        # The blob came out of our own checkpoint, whose DCP metadata is pickled anyway, so a
        # full unpickle adds no new trust requirement; CPU keeps GPU-saved tensors loadable.
        self.setter(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False))

    def estimate_bytes(self) -> int:
        return len(self.state_dict()[self._key()])
