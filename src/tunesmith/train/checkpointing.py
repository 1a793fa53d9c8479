"""The trainer's side of checkpoints: what goes in one, when to save, and restoring it.

A training checkpoint (`OUTPUT/checkpoints/step_XXXXXXXX/`, layout in `tunesmith.checkpoint`)
holds every piece of state the next step depends on: model, optimizer, LR scheduler, grad
scaler, `Progress` (step/epoch/tokens/skips), the logging window, the data loader's exact
position, and the RNG states; plus the resolved run config (`config.yaml`) and, under `hf/`,
the model's HF `config.json` and the tokenizer files so `tunesmith export` needs nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.checkpoint import (
    CheckpointManager,
    ObjectState,
    OptimizerState,
    RNGState,
    Stateful,
)
from tunesmith.checkpoint.export import HF_SUBDIR
from tunesmith.checkpoint.state import process_rank
from tunesmith.config import RunConfig
from tunesmith.models.io import write_hf_config
from tunesmith.peft import checkpoint_model_state
from tunesmith.train.metrics import LossWindow

log = logging.getLogger("tunesmith")


class DeferredRNGState(RNGState):
    """RNG state that is loaded with the rest but applied only by `apply()`.

    Loading happens during setup, where later construction work could still draw random
    numbers; the generators must be restored right before the first resumed step.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None
        # Resuming on more ranks than saved the checkpoint: this rank takes the streams of
        # saved rank `source_rank` (rank % saved world size); set only around the load.
        self.source_rank: int | None = None

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.source_rank is None:
            return sd
        return {f"rank_{self.source_rank}": next(iter(sd.values()))}  # the load template

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Keyed as this rank's own entry, whichever saved rank it came from.
        self._loaded = {f"rank_{process_rank()}": v for v in state_dict.values()}

    def apply(self) -> None:
        if self._loaded is not None:
            super().load_state_dict(self._loaded)
            self._loaded = None


def _scaler_state(scaler: torch.amp.GradScaler | None) -> ObjectState:
    # Always present (empty without a scaler) so switching precision on resume stays loadable.
    def load(sd: dict[str, Any]) -> None:
        if scaler is not None and sd:
            scaler.load_state_dict(sd)

    return ObjectState(lambda: scaler.state_dict() if scaler is not None else {}, load)


def trainer_state(*, model: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler,
                  scaler: torch.amp.GradScaler | None, progress: Stateful, window: LossWindow,
                  loader: Stateful, device: torch.device,
                  rng: RNGState | None = None) -> dict[str, Stateful]:
    """The `app_state` mapping for `CheckpointManager`: every piece of state the next step
    depends on, built before the `Trainer` that will own these objects."""
    return {
        # Only trained tensors when a frozen base exists (LoRA, freezing): the base is reloaded
        # from model.name on resume, so checkpoints stay small.
        "model": checkpoint_model_state(model),
        "optim": OptimizerState(model, optimizer),
        "sched": ObjectState(scheduler.state_dict, scheduler.load_state_dict),
        "scaler": _scaler_state(scaler),
        "progress": ObjectState(progress.state_dict, progress.load_state_dict),
        "window": ObjectState(window.state_dict, lambda sd: window.load_state_dict(sd, device)),
        # Every data-parallel rank is at the same (epoch, batch) position, so one copy serves
        # any world size on resume (per-rank copies would tie the checkpoint to its rank count).
        "loader": ObjectState(loader.state_dict, loader.load_state_dict),
        "rng": rng if rng is not None else RNGState(),
    }


def hf_files_writer(model_cfg: Any, dtype: torch.dtype, tokenizer: Any) -> Callable[[Path], None]:
    """`extra_files` hook: HF config + tokenizer under `hf/`, covered by the manifest."""

    def write(ckpt_dir: Path) -> None:
        hf = ckpt_dir / HF_SUBDIR
        hf.mkdir()
        write_hf_config(hf, model_cfg, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(hf))

    return write


class Checkpointer:
    """When to save, and saving: `due()` at each step boundary, `save()` to write one."""

    def __init__(self, cfg: RunConfig, manager: CheckpointManager, app_state: dict[str, Stateful],
                 extra_files: Callable[[Path], None] | None) -> None:
        self.cfg = cfg.checkpoint
        self.manager = manager
        self.app_state = app_state
        self.extra_files = extra_files
        self.config = cfg.model_dump(mode="json")
        self.last_step: int | None = None
        self.last_path: Path | None = None

    def due(self, step: int, epoch_end: bool, last: bool) -> bool:
        c = self.cfg
        return bool(
            (c.every_steps and step % c.every_steps == 0)
            or (c.every_epoch and epoch_end)
            or (last and c.periodic)  # a periodic run always ends on a checkpoint
        )

    def save(self, step: int, meta: dict[str, Any] | None = None) -> Path:
        if self.last_step == step and self.last_path is not None and self.last_path.is_dir():
            return self.last_path  # e.g. preempted right after a scheduled save
        path = self.manager.save(step, self.app_state, config=self.config, meta=meta,
                                 extra_files=self.extra_files)
        self.last_step, self.last_path = step, path
        log.info("saved checkpoint %s", path)
        return path
