"""The trainer setup's distributed steps, kept here so `tunesmith.train.setup` stays short:

    ctx, rt = start_parallel(cfg, rt, mcfg)  # validate (no comms) -> process group -> mesh
    model = build_parallel_model(...)        # meta -> parallelize -> allocate shards -> fill
    with main_rank_first(ctx): build data    # rank 0 fills the tokenisation cache first
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from tunesmith.config.schema import RunConfig
from tunesmith.parallel.apply import parallelize
from tunesmith.parallel.dist import ParallelContext, init_parallel
from tunesmith.parallel.layout import check_run, env_world, resolve_layout
from tunesmith.runtime import Runtime

log = logging.getLogger("tunesmith")


def start_parallel(cfg: RunConfig, rt: Runtime, model_cfg: Any) -> tuple[ParallelContext, Runtime]:
    """Check the layout against the world, model and data, then start the process group.

    Every check that can fail on the user's input runs before `init_process_group`, so a bad
    layout exits 2 on every rank at once instead of leaving peers waiting in a rendezvous.
    """
    world, local_world = env_world()
    layout = resolve_layout(cfg.parallel, world, local_world)
    check_run(cfg, layout, model_cfg, rt.device.type)
    ctx = init_parallel(cfg.parallel, rt.device, layout)
    # Per-rank GPU (cuda:LOCAL_RANK): the runtime points at it from here on.
    return ctx, dataclasses.replace(rt, device=ctx.device)


def build_parallel_model(cfg: RunConfig, rt: Runtime, ctx: ParallelContext, family: Any,
                         model_cfg: Any, pretrained: bool, *, dtype: torch.dtype | None = None,
                         prepare: Callable[[nn.Module, bool], None] | None = None,
                         fill: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """The model, parallelised and holding its weights (pretrained or seeded init).

    `prepare(model, on_meta)` changes the model's structure (PEFT: freezing, LoRA layers,
    frozen dtypes); `fill(model)` then gives the new tensors their values (adapter init or a
    loaded adapter). One process: materialise in `dtype` (default the runtime's parameter
    dtype), prepare, fill, then parallelize (AC, compile). Several: build on meta, prepare on
    meta, parallelize, allocate only this rank's shards and stream the base weights into them,
    then fill the adapters shard by shard.
    """
    from tunesmith.models import build_model, init_random, load_pretrained

    mc = cfg.model
    model = build_model(family, model_cfg, device="meta")
    if not ctx.distributed:
        dtype = dtype or rt.param_dtype
        if pretrained:
            load_pretrained(model, mc.name, device=rt.device, dtype=dtype,
                            allow_pickle=mc.allow_unsafe_pickle)
        else:
            init_random(model, device=rt.device, dtype=dtype, seed=cfg.train.seed)
        if prepare is not None:
            prepare(model, False)
        if fill is not None:
            fill(model)
        return parallelize(model, cfg, ctx, rt)
    from tunesmith.parallel.loading import materialize

    model.to(dtype=rt.param_dtype)  # on meta: metadata only, before sharding fixes dtypes
    base_names = frozenset(model.state_dict())
    if prepare is not None:
        prepare(model, True)  # before FSDP2: it shards whatever parameters exist then
    added = frozenset(model.state_dict()) - base_names
    parallelize(model, cfg, ctx, rt)
    materialize(model, ctx, rt, family=family, model_cfg=model_cfg,
                source=mc.name if pretrained else None, seed=cfg.train.seed,
                allow_pickle=mc.allow_unsafe_pickle, offload=cfg.parallel.cpu_offload, skip=added)
    if fill is not None:
        fill(model)
    return model


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
