"""Global gradient-norm clipping that works for plain, FSDP2-sharded and TP DTensor gradients.

The global norm is over the *full* gradients: ||g||^2 = sum over parameters of the squared
norm of the unsharded gradient. For a DTensor gradient each rank holds one piece; pieces along
Shard mesh dims are distinct, pieces along Replicate dims are copies. So each rank adds
||local||^2 / (product of its Replicate dims' sizes), and the sum over every rank of the mesh
(all-reduced one mesh dim at a time) is exactly the full squared norm, whatever the mix of
placements (2-D FSDP x TP, TP with replicated norm weights, ...). Plain (DDP) gradients are
identical on every rank after the all-reduce and are summed locally.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def _replicas(g: DTensor) -> int:
    mesh = g.device_mesh
    return math.prod(mesh.size(i) for i, p in enumerate(g.placements) if isinstance(p, Replicate))


def _mesh_key(g: DTensor) -> tuple:
    mesh = g.device_mesh
    return (mesh.device_type, tuple(mesh.mesh.flatten().tolist()), mesh.mesh.shape)


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of `grads` (fp32 scalar, plain tensor, identical on every rank)."""
    plain = [g for g in grads if not isinstance(g, DTensor)]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    if plain:
        sq += sum(torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in plain)
    by_mesh: dict[tuple, list[DTensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            by_mesh.setdefault(_mesh_key(g), []).append(g)
    for group in by_mesh.values():
        local = torch.zeros((), dtype=torch.float32, device=group[0].to_local().device)
        for g in group:
            local += torch.linalg.vector_norm(g.to_local(), dtype=torch.float32) ** 2 / _replicas(g)
        mesh = group[0].device_mesh
        for dim in range(mesh.ndim):
            if mesh.size(dim) > 1:
                dist.all_reduce(local, group=mesh.get_group(dim))
        sq += local.to(device)
    return sq.sqrt()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip gradients of `params` in place to global norm `max_norm` (None/inf: measure only).

    Returns the pre-clip global norm as a plain fp32 tensor on the gradients' device.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = total_grad_norm(grads)
    if max_norm is None or math.isinf(max_norm):
        return norm
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        local.mul_(coef.to(local.device, local.dtype))
    return norm
