"""Training checkpoints: atomic DCP saves with manifests, keep-last-K, verified resume.

Typical use by a trainer::

    app_state = {
        "model": ModelState(model),
        "optim": OptimizerState(model, optimizer),
        "sched": ObjectState(scheduler.state_dict, scheduler.load_state_dict),
        "progress": ObjectState(progress.state_dict, progress.load_state_dict),
        "loader": ObjectState(loader.state_dict, loader.load_state_dict, per_rank=True),
        "rng": RNGState(),
    }
    mgr = CheckpointManager(run_dir, keep_last=3)
    mgr.cleanup_partial()
    if (ckpt := mgr.resolve(resume)) is not None:
        mgr.load(ckpt, app_state)
    ...
    mgr.save(step, app_state, config=resolved_config)
"""

from tunesmith.checkpoint.manager import CheckpointManager, VerifyMode, check_disk, estimate_bytes
from tunesmith.checkpoint.safe_load import load_weights_file
from tunesmith.checkpoint.state import ModelState, ObjectState, OptimizerState, RNGState, Stateful, process_rank

__all__ = [
    "CheckpointManager",
    "VerifyMode",
    "check_disk",
    "estimate_bytes",
    "load_weights_file",
    "ModelState",
    "ObjectState",
    "OptimizerState",
    "RNGState",
    "Stateful",
    "process_rank",
]
