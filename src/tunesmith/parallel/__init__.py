"""Scale-out on PyTorch's own distributed engine, and transforms that change how a model executes,
all applied from outside the model (torchtitan style): FSDP2 / HSDP / DDP, tensor parallel
(DTensor), 2-D meshes, activation checkpointing, sharded loading, and the torchrun launcher.

Entry points: `init_parallel` (process group + mesh), `parallelize` (TP -> AC -> compile ->
FSDP2/DDP), `materialize` (allocate shards and stream weights), `apply_activation_checkpointing`
(also usable alone, e.g. for LoRA), `resolve_layout` (degrees, checked without communication).
"""

from tunesmith.parallel.ac import apply_activation_checkpointing
from tunesmith.parallel.layout import Layout, check_run, env_world, resolve_layout

__all__ = ["Layout", "apply_activation_checkpointing", "check_run", "env_world", "resolve_layout"]
