"""The CLI's multi-process side: `tunesmith launch`, and rank-aware error reporting for workers.

Under torchrun every rank runs the same CLI. Only rank 0 logs progress at INFO; a user error is
printed by rank 0, or by any rank once the process group is up (then it may be that rank's own
problem), always prefixed with the rank. Errors are also written to torchrun's per-rank error
file, so the agent's summary, and `tunesmith launch`, name the failing rank and its message.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tunesmith.errors import TunesmithError


def env_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main_rank() -> bool:
    return env_rank() == 0


def under_torchrun() -> bool:
    return bool(os.environ.get("TORCHELASTIC_ERROR_FILE"))


def record_worker_error(e: BaseException) -> None:
    """Write `e` to torchrun's error file for this rank (no-op outside torchrun)."""
    if not under_torchrun():
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(e)


def report_error(e: TunesmithError) -> None:
    """Print a user error once per job where possible; record it for torchrun."""
    record_worker_error(e)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world == 1:
        print(f"tunesmith: error: {e}", file=sys.stderr)
        return
    started = False
    try:
        import torch.distributed as dist

        started = dist.is_available() and dist.is_initialized()
    except ImportError:
        pass
    # Before the process group exists, errors come from the config and are the same on every
    # rank: rank 0 speaks for all. After, a rank may fail alone: each says so.
    if is_main_rank() or started:
        print(f"tunesmith: error (rank {env_rank()}): {e}", file=sys.stderr)


def with_torchrun_record(fn: Callable[[], int]) -> Callable[[], int]:
    """Under torchrun, record uncaught exceptions (bugs) in the error file before they escape."""
    if not under_torchrun():
        return fn
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)


def run_worker(fn: Callable[[], int]) -> int:
    """Run the CLI body; after a failure on NCCL, leave at once with `os._exit`.

    The error is recorded (torchrun's error file) and printed first. Then, rather than let
    interpreter teardown destroy a communicator that a peer may still be blocked in (which
    can hang the job instead of failing it), the process exits without cleanup: torchrun sees
    the failure, names this rank, and stops the others.
    """
    try:
        code = with_torchrun_record(fn)()
    except BaseException:
        if not _hard_exit_needed():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    if code != 0 and _hard_exit_needed():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _hard_exit_needed() -> bool:
    try:
        from tunesmith.parallel.dist import needs_hard_exit
    except ImportError:
        return False
    return needs_hard_exit()


def _launch(args: argparse.Namespace) -> int:
    from tunesmith.parallel.launch import launch

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        recipe, overrides = None, [recipe, *overrides]  # overrides only, no recipe file
    args.recipe, args.overrides = recipe, overrides
    worker = [*(["--debug"] if args.debug else []), *(["-q"] if args.quiet else []), "train"]
    worker += [recipe] if recipe is not None else []
    return launch(args, [*worker, *overrides])


def add_launch_command(sub: argparse._SubParsersAction) -> None:
    from tunesmith.parallel.launch import add_launch_args

    p = sub.add_parser(
        "launch", help="run `train` on several processes/GPUs via torchrun (one node or many)",
        description="Validates the recipe's parallel layout for nnodes x nproc-per-node ranks, "
        "then starts `tunesmith train RECIPE [overrides]` on each rank with torchrun. "
        "Multi-node: run the same command on every node with --nnodes, --rdzv-endpoint and "
        "--rdzv-id (see examples/slurm/train.sbatch).",
    )
    add_launch_args(p)
    p.set_defaults(func=_launch)
