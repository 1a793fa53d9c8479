"""Tensor and expert parallelism for the MoE family: experts split by expert over a group of
ranks (DTensor Shard(0) of `experts.w13` [E, 2I, D] and `experts.w2` [E, D, I]).

Lives beside the model because it names the model's submodules; applied from outside
(`tunesmith.parallel.tp`, `tunesmith.parallel.apply`), so `model.py` stays single-device code.

Why the expert dim and not the intermediate dim under TP: w13 stacks each expert's gate rows
then its up rows, so an intermediate-dim split must give every rank matching halves of both
(rows [r*I/tp, (r+1)*I/tp) of gate *and* of up). The only DTensor placement describing that
(`_StridedShard(1, split_factor=2)`) cannot be saved by torch.distributed.checkpoint (its two
pieces per rank are "overlapping chunks": checked on torch 2.13), and a layout change ([E, 2, I,
D], or separate gate/up tensors) would change the checkpoint format. Splitting the experts
between the TP ranks keeps checkpoints, resharding and HF export unchanged (a plain Shard(0))
and costs the same communication as an intermediate-dim split: the layer input is all-gathered
([B, T/tp, D] -> [B, T, D]), each rank runs the token assignments of its E/tp experts, and the
partial outputs are reduce-scattered back to [B, T/tp, D], once per MoE layer.

    tensor parallel (parallel.tp)     every TP rank sees the same tokens; rank r holds experts
                                      [r E/tp, (r+1) E/tp), runs the assignments routed to them
                                      and contributes zeros for the rest; the block's output
                                      hook sums the partial outputs (reduce-scatter).
    expert parallel (parallel.ep)     data-parallel ranks see different tokens; each rank sends
                                      every (token, expert) assignment to the rank holding the
                                      expert (all-to-all), runs what it received, and sends the
                                      outputs back (all-to-all); the rest is as one process.

LoRA on the experts (peft.experts.LoRAExperts) lists its per-expert A / B in
`expert_param_names`, so they are split with the experts, and its projection hooks run first
(the sharded class's MRO: LoRAExperts, ShardedExperts, Experts), reading this rank's pieces
through `local_piece`.

The router stays a plain replicated module: with the same (gathered) input on every TP rank the
routing is identical. Gradients: under TP, the expert path's input and routing-weight gradients
are partial sums (each rank only sees its experts' share), so both are summed over the TP group
in backward (identity forward, all-reduce backward, Megatron's `f`); the router's gradient and
the layer input's are then whole on every rank, and the router weight needs no reduction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, PrepareModuleInputOutput

from tunesmith.errors import TunesmithError
from tunesmith.models.llama import parallel_plan as llama_plan
from tunesmith.models.llama.parallel_plan import top_plan
from tunesmith.models.moe import model as moe_model
from tunesmith.models.moe.model import Experts, SparseMoE

__all__ = ["ShardedExperts", "block_plan", "check_tp_shape", "expert_parallel", "shard_experts",
           "top_plan"]


# ------------------------------------------------------------------ differentiable collectives
class _SumGradients(torch.autograd.Function):
    """Identity forward; backward sums the gradient over `group` (Megatron's f operator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _AllToAll(torch.autograd.Function):
    """rows [sum(send), D] -> [sum(recv), D]: the first send[0] rows go to rank 0 of `group`,
    and so on; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int],  # type: ignore[override]
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.recv, ctx.send, ctx.group = recv, send, group
        out = x.new_empty(sum(recv), x.shape[1])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out = grad.new_empty(sum(ctx.send), grad.shape[1])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


# ------------------------------------------------------------------ the sharded experts
def _count(ids: torch.Tensor, n: int) -> torch.Tensor:
    """[n] occurrences of each id in 0..n-1 (fixed-shape scatter, as `Experts.forward`)."""
    return torch.zeros(n, dtype=ids.dtype, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


class ShardedExperts(Experts):
    """`Experts` whose w13 / w2 are DTensors Shard(0) over a group of `size` ranks: this rank
    holds experts [rank * E_local, (rank + 1) * E_local). Same parameter names and global
    shapes, so state dicts, checkpoints and HF export see the usual [E, ...] tensors.
    `mode` "tp": the group's ranks hold the same tokens (partial outputs, summed by the
    caller); "ep": different tokens, exchanged with all-to-all (whole outputs)."""

    mode: str
    group: dist.ProcessGroup
    rank: int
    size: int
    grad_scale: float  # on the expert weights' gradients (ep: see `shard_experts`)
    _local: dict[str, torch.Tensor]  # during forward: this rank's w13 / w2 pieces (plain tensors)

    # Not compiled (the rest of the block is): the row counts are read on the host (all-to-all
    # split sizes, the per-expert loop), a graph break either way, and the collectives sit in
    # custom autograd functions.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights / experts [N, k] -> [N, D]."""
        # This rank's pieces of every expert-dim parameter, by name: w13 [E_local, 2I, D],
        # w2 [E_local, D, I], and a subclass's (LoRA: "lora.w13.lora_A" [E_local, r, D], ...).
        self._local = {}  # what the projection hooks read
        for name in self.expert_param_names():
            local = self.get_parameter(name).to_local()
            if self.grad_scale != 1.0 and local.requires_grad:
                local = _ScaleGradient.apply(local, self.grad_scale)
            self._local[name] = local
        try:
            if self.mode == "tp":
                return self._forward_tp(x, weights, experts)
            return self._forward_ep(x, weights, experts)
        finally:
            self._local = {}

    def _local_mlp(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [R, D] sorted by local expert (counts [E_local]) through this rank's experts, with
        `Experts`' own loop / grouped GEMM (their projection hooks read the local pieces)."""
        w2 = self._local["w2"]
        use_grouped = moe_model._backend == "grouped" or (
            moe_model._backend == "auto" and moe_model.grouped_mm_available(xs, w2))
        ys = self._grouped(xs, counts) if use_grouped else self._loop(xs, counts)  # [R, D]
        if ys.shape[0]:
            return ys
        # No rows reached this rank's experts: zero gradients all the same (the trained pieces
        # stay in the graph), so every rank has the same gradients for FSDP2 to reduce.
        return ys + sum(0 * t.sum() for t in self._local.values() if t.requires_grad)

    def expert_linear(self, name: str, rows: torch.Tensor, e: int) -> torch.Tensor:
        return F.linear(rows, self._local[name][e])  # e: the local expert index

    def local_piece(self, name: str) -> torch.Tensor:
        """This rank's piece of the expert-dim parameter `name` during forward."""
        return self._local[name]

    def grouped_linear(self, name: str, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(x, self._local[name].to(x.dtype).transpose(-2, -1), offs=offs)

    def _forward_tp(self, x, weights, experts) -> torch.Tensor:
        n, k = experts.shape
        n_local = self._local["w13"].shape[0]
        # Only this rank's experts reach x and the weights: their gradients are partial sums.
        x, weights = _SumGradients.apply(x, self.group), _SumGradients.apply(weights, self.group)
        flat = experts.reshape(-1) - self.rank * n_local  # [N*k] local expert ids (others out of range)
        mine = ((flat >= 0) & (flat < n_local)).nonzero().squeeze(1)  # [M] assignments held here
        local = flat[mine]
        order = mine[torch.argsort(local, stable=True)]  # grouped by local expert
        ys = self._local_mlp(x[order // k], _count(local, n_local))  # [M, D]
        weighted = ys * weights.reshape(-1)[order, None]
        # Zeros for the assignments other ranks run; the caller sums over the TP group.
        full = weighted.new_zeros(n * k, weighted.shape[1]).index_copy(0, order, weighted)
        return full.view(n, k, -1).sum(dim=1).to(x.dtype)

    def _forward_ep(self, x, weights, experts) -> torch.Tensor:
        n, k = experts.shape
        n_local = self._local["w13"].shape[0]
        flat = experts.reshape(-1)  # [N*k]
        order = torch.argsort(flat, stable=True)  # by expert, hence by the rank that holds it
        counts = _count(flat, n_local * self.size)  # [E] rows this rank sends to each expert
        got = torch.empty_like(counts)  # [size * E_local]: rows of my experts from each rank
        dist.all_to_all_single(got, counts, group=self.group)
        got_by_rank = got.view(self.size, n_local)
        send = counts.view(self.size, n_local).sum(1).tolist()
        recv = got_by_rank.sum(1).tolist()
        rows = _AllToAll.apply(x[order // k], recv, send, self.group)  # by source rank, then expert
        # Regroup by local expert (stable: source rank order within an expert).
        ids = torch.arange(n_local, device=x.device).repeat(self.size)  # [size * E_local]
        perm = torch.argsort(torch.repeat_interleave(ids, got_by_rank.reshape(-1)), stable=True)
        ys = self._local_mlp(rows[perm], got_by_rank.sum(0))  # [R, D]
        ys = _AllToAll.apply(torch.empty_like(ys).index_copy(0, perm, ys), send, recv, self.group)
        # Back on the source rank, in `order`: as `Experts.forward` from here on.
        weighted = ys * weights.reshape(-1)[order, None]
        unsorted = torch.empty_like(weighted).index_copy_(0, order, weighted)
        return unsorted.view(n, k, -1).sum(dim=1).to(x.dtype)


_SHARDED_CLASSES: dict[type, type] = {Experts: ShardedExperts}


def _sharded_class(cls: type) -> type:
    """ShardedExperts for plain experts; for a subclass that adds to the projection hooks (LoRA
    on the experts), a class whose hooks run the subclass's first, then ShardedExperts' on
    this rank's pieces (MRO: cls, ShardedExperts, Experts)."""
    if cls not in _SHARDED_CLASSES:
        _SHARDED_CLASSES[cls] = type(f"Sharded{cls.__name__}", (cls, ShardedExperts), {})
    return _SHARDED_CLASSES[cls]


def shard_experts(module: Experts, mesh: DeviceMesh, mode: str, grad_scale: float = 1.0) -> None:
    """Split `module`'s experts over the 1-D `mesh` in place (works on meta): every parameter
    named by `expert_param_names()` (the expert dim first) becomes a DTensor Shard(0). Expert
    parallelism passes grad_scale = 1/ep: FSDP2 averages the expert gradients over the
    ep_replicate ranks only, while the loss of each rank is scaled for an average over all dp
    ranks."""
    if not isinstance(module, Experts) or isinstance(module, ShardedExperts):
        raise TunesmithError(f"parallel.tp / parallel.ep cannot split {type(module).__name__}")
    for name in module.expert_param_names():
        owner, _, leaf = name.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        p = getattr(holder, leaf)
        dt = distribute_tensor(p, mesh, [Shard(0)], src_data_rank=None if p.is_meta else 0)
        holder.register_parameter(leaf, nn.Parameter(dt, requires_grad=p.requires_grad))
    module.__class__ = _sharded_class(type(module))
    module.mode, module.group = mode, mesh.get_group()  # type: ignore[attr-defined]
    module.rank, module.size = mesh.get_local_rank(), mesh.size()  # type: ignore[attr-defined]
    module.grad_scale = grad_scale  # type: ignore[attr-defined]


def expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, grad_scale: float) -> list[nn.Module]:
    """Expert parallelism: every sparse layer's experts split over `ep_mesh` (1-D), tokens
    exchanged with all-to-all. Returns the expert modules (FSDP2 wraps each on its own mesh)."""
    mods = [m.experts for m in model.modules() if isinstance(m, SparseMoE)]
    for m in mods:
        shard_experts(m, ep_mesh, "ep", grad_scale)
    return mods


class _ExpertTP(ParallelStyle):
    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        shard_experts(module, device_mesh, "tp")  # type: ignore[arg-type]
        return module


# ------------------------------------------------------------------ the TP plan
def block_plan(block: nn.Module | None = None) -> dict[str, ParallelStyle]:
    """The Llama plan (attention, norms; dense SwiGLU layers of Qwen3-MoE as Llama's MLP); a
    sparse layer takes its input all-gathered [B, T, D] (replicated: the router sees every
    token on every rank), runs this rank's experts, and reduce-scatters the partial sums back
    to [B, T/tp, D]."""
    plan = llama_plan.block_plan(block)
    if block is not None and isinstance(block.feed_forward, SparseMoE):
        for name in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            del plan[name]
        plan["feed_forward"] = PrepareModuleInputOutput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Partial(),), desired_output_layouts=(Shard(1),), use_local_output=True)
        plan["feed_forward.experts"] = _ExpertTP()
    return plan


def check_tp_shape(model: nn.Module, tp: int) -> None:
    """Whole heads, whole experts per rank, equal slices of any dense layer's MLP."""
    cfg = model.cfg  # type: ignore[attr-defined]
    names = ["n_heads", "n_kv_heads", "num_experts"]
    if len(cfg.sparse_layers) < cfg.n_layers:
        names.append("intermediate_size")
    for name in names:
        if int(getattr(cfg, name)) % tp:
            raise ValueError(f"tp={tp} does not divide {name}={getattr(cfg, name)}")
