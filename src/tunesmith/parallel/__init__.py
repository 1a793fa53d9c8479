"""Scale-out on PyTorch's own distributed engine: FSDP2 / HSDP / DDP, tensor parallel (DTensor),
2-D meshes, activation checkpointing, sharded loading, and the torchrun launcher.

Model code stays single-device; everything here is applied from outside. Entry points:
`init_parallel` (process group + mesh), `parallelize` (TP -> AC -> compile -> FSDP2/DDP),
`materialize` (allocate shards and stream weights), `launch` (torchrun wrapper).
"""

from tunesmith.parallel.layout import Layout, check_run, env_world, resolve_layout

__all__ = ["Layout", "check_run", "env_world", "resolve_layout"]
