"""Process group, device mesh and the per-rank facts the trainer needs (`ParallelContext`).

`init_parallel` is the only place that starts collectives. It reads the torchrun environment
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; torchrun and our Slurm script both set them),
validates the layout first (pure arithmetic, `tunesmith.parallel.layout`), and only then calls
`init_process_group` with the configured timeout so a dead or hung peer fails the job instead
of hanging it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tunesmith.config.schema import ParallelConfig
from tunesmith.errors import TunesmithError
from tunesmith.parallel.layout import Layout, env_world, resolve_layout

log = logging.getLogger("tunesmith")

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelContext:
    """Where this process sits. With one process: rank 0 of 1, no mesh, no groups."""

    layout: Layout
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None  # 4-D (dp_replicate, dp_shard, cp, tp)
    dp_mesh: DeviceMesh | None = None  # 1-D, the flattened data-parallel ranks
    # 1-D, dp_replicate x dp_shard x cp flattened: the ranks holding different tokens of a
    # step (loss sums and target counts add up over it; DDP averages gradients over it).
    token_mesh: DeviceMesh | None = None
    # 2-D (ep_replicate, ep) over the data-parallel ranks when parallel.ep > 1: an expert group
    # is ep consecutive ranks (experts Shard(0) over "ep"); FSDP2 shards each expert shard
    # further over "ep_replicate", the groups holding the same experts.
    ep_mesh: DeviceMesh | None = None

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that prints progress and writes non-sharded files."""
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank() if self.dp_mesh is not None else 0

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.dp_mesh.get_group() if self.dp_mesh is not None else None

    @property
    def token_ranks(self) -> int:
        """Ranks that hold different tokens of a step: dp x cp (gradients are averaged over them)."""
        return self.layout.dp * self.layout.cp

    def all_reduce_dp(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over data-parallel ranks in place (TP ranks of a DP group hold equal values)."""
        if self.dp_mesh is not None and self.dp_size > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t

    def all_reduce_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks holding different tokens (dp x cp) in place: per-token sums
        (loss, target counts) of one step. Equals `all_reduce_dp` without context parallelism."""
        if self.token_mesh is not None and self.token_ranks > 1:
            dist.all_reduce(t, group=self.token_mesh.get_group())
        return t

    def all_gather_dp(self, obj: Any) -> list[Any]:
        """Every data-parallel rank's `obj` (picklable), in rank order; [obj] on one rank."""
        if self.dp_mesh is None or self.dp_size == 1:
            return [obj]
        parts: list[Any] = [None] * self.dp_size
        dist.all_gather_object(parts, obj, group=self.dp_group)
        return parts

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def single_process() -> ParallelContext:
    return ParallelContext(Layout("no_shard", 1, 1, 1, 1))


_CURRENT: list[ParallelContext] = []


def current() -> ParallelContext | None:
    """The context of the running job (set by `init_parallel`), for code far from the trainer
    (task data loaders) that must shard by data-parallel rank, not by global rank."""
    return _CURRENT[-1] if _CURRENT else None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise TunesmithError(f"environment variable {name}={raw!r} is not an integer") from None


def _backend(pc: ParallelConfig, device: torch.device) -> str:
    if pc.backend != "auto":
        if pc.backend == "nccl" and device.type != "cuda":
            raise TunesmithError("parallel.backend=nccl needs CUDA devices; use gloo on CPU")
        return pc.backend
    return "nccl" if device.type == "cuda" else "gloo"


def set_comm_env(pc: ParallelConfig) -> None:
    """Environment the communication libraries read at communicator creation."""
    # NVLink multicast (NVLS) stays off: it needs fabric-manager support that not every
    # machine has, and a failed NVLS setup hangs communicator init instead of failing.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if pc.nccl_debug is not None:
        os.environ["NCCL_DEBUG"] = pc.nccl_debug
    # On a collective error or timeout the NCCL watchdog ends the process (so a dead or hung
    # peer fails the job) *without* aborting the communicator first: mode 1 (abort, then tear
    # down) hangs inside ncclCommAbort when the peer never aborts too, which is exactly the
    # hung-peer case. 3 is also torch's default; a value the user exported wins.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")


def _pick_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise TunesmithError(
            f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
            "lower --nproc-per-node"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


# Meshes of this process by (device, mesh shape, ep), for the default group they were made in:
# a later run in the same process (the Python API, a test worker running many jobs) reuses them.
# Each new mesh makes new process groups, and a gloo/NCCL group keeps its threads (and sockets
# or communicators) until the process ends.
_MESHES: dict[tuple, tuple[DeviceMesh, DeviceMesh, DeviceMesh, DeviceMesh | None]] = {}


def _meshes(device: torch.device, layout: Layout, world: int
            ) -> tuple[DeviceMesh, DeviceMesh, DeviceMesh, DeviceMesh | None]:
    """(mesh, dp mesh, dp x cp token mesh, expert mesh or None) for this layout."""
    key = (dist.group.WORLD, str(device), layout.mesh_shape, layout.ep)
    if key not in _MESHES:
        mesh = init_device_mesh(device.type, layout.mesh_shape, mesh_dim_names=MESH_DIMS)
        dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")  # FSDP2's shard dimension (parallel.apply)
        token_mesh = mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        ep_mesh = None
        if layout.ep > 1:  # tp = cp = 1 (layout checks): the data-parallel ranks are all ranks
            ep_mesh = init_device_mesh(device.type, (world // layout.ep, layout.ep),
                                       mesh_dim_names=("ep_replicate", "ep"))
        _MESHES[key] = (mesh, dp_mesh, token_mesh, ep_mesh)
    return _MESHES[key]


def init_parallel(pc: ParallelConfig, device: torch.device, layout: Layout | None = None) -> ParallelContext:
    """Validate the layout for this world, then (world > 1) start the process group and mesh.

    Idempotent within a process: an already-initialised default group is reused.
    """
    world, local_world = env_world()
    layout = layout or resolve_layout(pc, world, local_world)
    if world == 1:
        _CURRENT[:] = []
        return ParallelContext(layout, device=device)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = _pick_device(device, local_rank)
    set_comm_env(pc)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=pc.timeout_s)
        dist.init_process_group(_backend(pc, device), timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        # Destroy the group before interpreter teardown: a gloo/NCCL group left alive until
        # exit can abort the process ("terminate called without an active exception").
        atexit.register(shutdown)
    mesh, dp_mesh, token_mesh, ep_mesh = _meshes(device, layout, world)
    ctx = ParallelContext(layout, rank, local_rank, device, mesh, dp_mesh, token_mesh, ep_mesh)
    _CURRENT[:] = [ctx]
    if ctx.is_main:
        log.info("parallel: %s", layout.describe())
    return ctx


def shutdown() -> None:
    _MESHES.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def needs_hard_exit() -> bool:
    """True when this process must leave with `os._exit` after a failure.

    After an error on NCCL a peer may still sit in a collective this rank will never join;
    destroying (or, at interpreter teardown, aborting) the communicator can then block
    forever, and the job would hang instead of failing. Gloo tears down cleanly.
    """
    return dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"


@contextlib.contextmanager
def main_rank_first(ctx: ParallelContext | None) -> Iterator[None]:
    """Rank 0 runs the body first (e.g. fills a cache); the others run it after, as readers."""
    if ctx is None or not ctx.distributed:
        yield
        return
    if not ctx.is_main:
        ctx.barrier()
    try:
        yield
    finally:
        if ctx.is_main:
            ctx.barrier()
