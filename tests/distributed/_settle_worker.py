"""torchrun worker (4 ranks, a 2 x 2 dp x tp mesh): `settle_partial_grads` turns TP-Partial
gradients into their parameters' placements with bucketed all-reduces, exactly as DTensor's own
redistribute does.

Parameters: Shard(0) x Replicate (FSDP2-sharded norm / LoRA weights under TP), Replicate x
Replicate, a [4, 3] matrix, and one Shard x Shard parameter whose gradient is not Partial (left
alone). Their gradients are Partial on the tp dim with different local values on every rank.
Checks: placements, global shape, values (bit-exact against redistribute), and that the three
Partial gradients went out as one bucket. Prints one line per rank; exits 1 on a mismatch."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
)

import tunesmith.parallel.grad as grad_mod

SPECS = [((6,), (Shard(0), Replicate())), ((4, 3), (Shard(0), Replicate())),
         ((5,), (Replicate(), Replicate())), ((8,), (Shard(0), Shard(0)))]


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    buckets: list[tuple[int, tuple[int, ...]]] = []
    real = grad_mod._all_reduce_bucket
    grad_mod._all_reduce_bucket = lambda ps, dims: (buckets.append((len(ps), dims)), real(ps, dims))
    torch.manual_seed(0)  # the same full parameters on every rank
    params, want = [], []
    for shape, placements in SPECS:
        p = torch.nn.Parameter(distribute_tensor(torch.randn(shape), mesh, list(placements)))
        local = torch.randn(p.to_local().shape) * (rank + 1)  # differs per rank
        grad_placements = [Partial() if (i == 1 and isinstance(pl, Replicate)) else pl
                           for i, pl in enumerate(placements)]
        p.grad = DTensor.from_local(local, mesh, grad_placements, run_check=False,
                                    shape=p.shape, stride=p.stride())
        want.append(p.grad.redistribute(mesh, list(placements)).to_local().clone())
        params.append(p)
    grad_mod.settle_partial_grads(params)
    ok = buckets == [(3, (1,))]
    for p, w in zip(params, want, strict=True):
        ok &= (tuple(p.grad.placements) == tuple(p.placements) and p.grad.shape == p.shape
               and torch.equal(p.grad.to_local(), w))
    print(f"rank {rank}: {'ok' if ok else 'MISMATCH'} buckets={buckets}", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
