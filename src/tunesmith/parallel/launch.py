"""`tunesmith launch`: start `tunesmith train` on N processes per node through torchrun.

    tunesmith launch --nproc-per-node 8 recipe.yaml parallel.tp=2          # one node
    tunesmith launch --nnodes 4 --nproc-per-node 8 --rdzv-endpoint HOST:29500 \\
        --rdzv-id JOB recipe.yaml                                         # each node, multi-node

The recipe is loaded and the mesh layout validated for nnodes x nproc-per-node ranks *before*
any worker starts, so a bad layout costs nothing and exits 2. The workers run in torchrun's
elastic agent (`torch.distributed.run`), which watches them: when one fails, the others are
terminated and the launch fails with the failing rank and its error (each worker records its
exception in torchrun's error file, see `record_worker_error`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from tunesmith.config import load_config
from tunesmith.config.deepspeed import apply_deepspeed
from tunesmith.cpu import cpu_budget, user_set
from tunesmith.errors import TunesmithError
from tunesmith.parallel.layout import resolve_layout

log = logging.getLogger("tunesmith")


def add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc-per-node", type=int, required=True, help="processes (GPUs) per node")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (static rendezvous)")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (multi-node)")
    p.add_argument("--rdzv-id", default=None, help="job id shared by all nodes (multi-node)")
    p.add_argument("--rdzv-backend", default="c10d", help="torchrun rendezvous backend (default c10d)")
    p.add_argument("--max-restarts", type=int, default=0, help="restart the workers this often on failure")
    p.add_argument("--log-dir", default=None, help="torchrun log dir (per-rank stdout/stderr files)")
    p.add_argument("recipe", nargs="?", default=None, help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def validate(recipe: str | None, overrides: list[str], world: int, local_world: int):
    """Load the run config and check its layout for `world` ranks; nothing is started."""
    cfg = apply_deepspeed(load_config(recipe, overrides))
    layout = resolve_layout(cfg.parallel, world, local_world)
    return cfg, layout


def torchrun_argv(args: argparse.Namespace, module: str, worker_argv: Sequence[str]) -> list[str]:
    argv = ["--nproc-per-node", str(args.nproc_per_node), "--nnodes", str(args.nnodes),
            "--max-restarts", str(args.max_restarts), "--monitor-interval", "0.5"]
    if args.nnodes == 1 and args.rdzv_endpoint is None:
        argv.append("--standalone")  # a free local port, no rendezvous server to set up
    else:
        if args.rdzv_endpoint is None:
            raise TunesmithError("multi-node launch needs --rdzv-endpoint HOST:PORT (the first node)")
        argv += ["--rdzv-backend", args.rdzv_backend, "--rdzv-endpoint", args.rdzv_endpoint,
                 "--rdzv-id", args.rdzv_id or "tunesmith"]
        if args.node_rank is not None:
            argv += ["--node-rank", str(args.node_rank)]
    if args.log_dir:
        argv += ["--log-dir", args.log_dir]
    return [*argv, "-m", module, *worker_argv]


def worker_env(nproc: int, cfg) -> None:
    """Environment inherited by the workers (set only where the user has not)."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off, see parallel.dist
    if cfg.parallel.nccl_debug is not None:
        os.environ["NCCL_DEBUG"] = cfg.parallel.nccl_debug
    # torchrun would force 1 thread per worker; share the cores instead (CPU-side work:
    # data collation, CPU runs).
    if not user_set("OMP_NUM_THREADS"):
        os.environ["OMP_NUM_THREADS"] = str(max(1, cpu_budget() // max(1, nproc)))


def failure_line(err: BaseException) -> tuple[str, int]:
    """One line naming the first failing rank and its error, plus an exit code."""
    failures = getattr(err, "failures", None)
    if not failures:
        return f"launch failed: {err}", 1
    rank, failure = err.get_first_failure()  # type: ignore[attr-defined]
    message = str(failure.message or "").strip()
    if isinstance(failure.message, dict):
        message = str(failure.message.get("message", ""))
    first = message.splitlines()[0] if message else "no error recorded"
    code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
    others = len(failures) - 1
    more = f" ({others} other rank(s) also failed)" if others else ""
    return f"rank {rank} (local rank {failure.local_rank}) failed with exit code {failure.exitcode}: {first}{more}", code


def launch(args: argparse.Namespace, worker_argv: Sequence[str], module: str = "tunesmith") -> int:
    """Validate, then run `python -m module *worker_argv` on every rank under torchrun."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise TunesmithError("--nproc-per-node and --nnodes must be >= 1")
    if args.max_restarts < 0:
        raise TunesmithError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.node_rank is not None and not 0 <= args.node_rank < args.nnodes:
        raise TunesmithError(f"--node-rank must be in [0, {args.nnodes}), got {args.node_rank}")
    world = args.nnodes * args.nproc_per_node
    cfg, layout = validate(args.recipe, list(args.overrides), world, args.nproc_per_node)
    log.info("launching %d process(es) per node on %d node(s): %s",
             args.nproc_per_node, args.nnodes, layout.describe())
    worker_env(args.nproc_per_node, cfg)
    try:
        run(parse_args(torchrun_argv(args, module, worker_argv)))
    except ChildFailedError as e:
        line, code = failure_line(e)
        print(f"tunesmith: error: {line}", file=sys.stderr)
        return code
    return 0
