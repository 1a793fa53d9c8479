"""The device meshes of a process: made once per layout and default group, so a second run in
the same process (the Python API, the distributed tests' long-lived workers) makes no new
process groups, each of which would keep its communication threads until the process ends."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tunesmith.parallel import dist as pdist
from tunesmith.parallel.layout import Layout


def _one_rank_group() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def test_a_layout_s_meshes_are_made_once_per_default_group():
    layout, cpu = Layout("full_shard", 1, 1, 1, 1), torch.device("cpu")
    _one_rank_group()
    try:
        first = pdist._meshes(cpu, layout, 1)
        groups = len(dist.distributed_c10d._world.pg_map)
        again = pdist._meshes(cpu, layout, 1)
        assert all(a is b for a, b in zip(again, first, strict=True))
        assert len(dist.distributed_c10d._world.pg_map) == groups  # no new process group
        assert first[1].mesh_dim_names == ("dp",) and first[2].mesh_dim_names == ("dp_cp",)
    finally:
        pdist.shutdown()
    assert not pdist._MESHES  # the groups they hold are gone
    _one_rank_group()  # a new default group: meshes made in it, none of the old ones
    try:
        assert pdist._meshes(cpu, layout, 1)[0] is not first[0]
    finally:
        pdist.shutdown()
