"""Apply a model family's tensor-parallel plan (DTensor `parallelize_module`) from outside."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from tunesmith.errors import TunesmithError
from tunesmith.models.family import TPPlan
from tunesmith.models.registry import family_of


def _plan(model: nn.Module) -> TPPlan:
    """The plan the model's family declares (`ModelFamily.tp_plan`)."""
    family = family_of(model)
    if family.tp_plan is None:
        raise TunesmithError(f"tensor parallelism has no plan for the {family.name} family")
    return family.tp_plan


def _detach_view(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output.clone() if output._base is not None else output


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard `model` in place over `tp_mesh` (1-D). Works on a meta-device model too.

    Tied embeddings: parallelize_module gives tok_embeddings and output separate DTensor
    parameters; both are Shard(0) of the same [V, D] matrix, so re-tying afterwards restores
    one shared parameter with the right placement.
    """
    plan = _plan(model)
    plan.check_tp_shape(model, tp_mesh.size())
    for block in model.layers:  # type: ignore[attr-defined]
        parallelize_module(block, tp_mesh, plan.block_plan(block))
    parallelize_module(model, tp_mesh, plan.top_plan())
    # The embedding's sequence-sharded output [B, T/tp, D] is a view of its DTensor's local
    # tensor. Fed as is to a compiled first block, AOTAutograd hands the upstream redistribute
    # a plain-tensor gradient and backward fails; a copy (small, once per forward) cuts the view.
    model.tok_embeddings.register_forward_hook(_detach_view)  # type: ignore[union-attr]
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
