"""Apply a model family's tensor-parallel plan (DTensor `parallelize_module`) from outside.

A family's plan names `ColwiseParallel` / `RowwiseParallel` for its linear layers. A transform
applied before TP (LoRA, `peft`) may have replaced such a layer with a linear-like module: a 2-D
`weight` [out, in] (and `bias` [out]) plus parameters of its own. Such a module declares how its
own parameters split (`tp_param_dims`), and `apply_tp` swaps the style for one that shards
them with the weight, keeping the plan's input/output layouts. The family's plan itself never
needs to know which transforms ran.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

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


# ------------------------------------------------------------------- linear-like modules
def _shard_params(colwise: bool, src_data_rank: int | None, name: str, module: nn.Module,
                  mesh: DeviceMesh) -> None:
    """Partition one linear-like module: weight [out, in] Shard(0) colwise / Shard(1) rowwise,
    bias Shard(0) / Replicate as for nn.Linear, and each parameter of `tp_param_dims()` on the
    dim it names for this style (None: replicated)."""
    if name:  # distribute_module visits submodules too; only the module itself holds weights
        return
    dims: dict[str, tuple[int | None, int | None]] = {"weight": (0, 1), "bias": (0, None)}
    dims.update(module.tp_param_dims())  # type: ignore[operator]
    for pname, (col_dim, row_dim) in dims.items():
        param = getattr(module, pname, None)
        if param is None:
            continue
        dim = col_dim if colwise else row_dim
        placement = Replicate() if dim is None else Shard(dim)
        dt = distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank)
        module.register_parameter(pname, nn.Parameter(dt, requires_grad=param.requires_grad))


class _ColwiseLinearLike(ColwiseParallel):
    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, partial(_shard_params, True, getattr(self, "src_data_rank", 0)),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class _RowwiseLinearLike(RowwiseParallel):
    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)  # as RowwiseParallel sets for nn.Linear
        return distribute_module(
            module, device_mesh, partial(_shard_params, False, getattr(self, "src_data_rank", 0)),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


def _for_module(style: ParallelStyle, module: nn.Module) -> ParallelStyle:
    """`style` itself for nn.Linear / nn.Embedding and other styles; for a linear-like module
    (one with `tp_param_dims`) the same colwise / rowwise style that shards its parameters."""
    if isinstance(module, (nn.Linear, nn.Embedding)) or not hasattr(module, "tp_param_dims"):
        return style
    if type(style) not in (ColwiseParallel, RowwiseParallel):
        return style
    cls = _ColwiseLinearLike if isinstance(style, ColwiseParallel) else _RowwiseLinearLike
    out = cls(use_local_output=style.use_local_output)
    out.input_layouts, out.output_layouts = style.input_layouts, style.output_layouts
    return out  # desired_input_layouts: Replicate colwise (init), Shard(-1) rowwise (_apply)


def _resolved(root: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    return {name: _for_module(style, root.get_submodule(name)) for name, style in plan.items()}


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard `model` in place over `tp_mesh` (1-D). Works on a meta-device model too.

    Tied embeddings: parallelize_module gives tok_embeddings and output separate DTensor
    parameters; both are Shard(0) of the same [V, D] matrix, so re-tying afterwards restores
    one shared parameter with the right placement.
    """
    plan = _plan(model)
    plan.check_tp_shape(model, tp_mesh.size())
    # SequenceParallel re-registers the norm weights as new Parameters that require grad, which
    # would silently train weights that peft froze (LoRA's base, peft.freeze_layers): the
    # frozen set is restored afterwards.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for block in model.layers:  # type: ignore[attr-defined]
        parallelize_module(block, tp_mesh, _resolved(block, plan.block_plan(block)))
    parallelize_module(model, tp_mesh, _resolved(model, plan.top_plan()))
    # The embedding's sequence-sharded output [B, T/tp, D] is a view of its DTensor's local
    # tensor. Fed as is to a compiled first block, AOTAutograd hands the upstream redistribute
    # a plain-tensor gradient and backward fails; a copy (small, once per forward) cuts the view.
    model.tok_embeddings.register_forward_hook(_detach_view)  # type: ignore[union-attr]
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
