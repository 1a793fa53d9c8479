"""Build a `Trainer` from a `RunConfig`: output dir, runtime, tokenizer, data, model, optimizer.

Order matters for "nothing half-written": every check that can fail on bad input (config, data,
tokenizer, model shape) runs before anything is written to the output directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tunesmith.config import RunConfig, dump_config
from tunesmith.errors import TunesmithError
from tunesmith.train.optim import build_optimizer, build_scheduler
from tunesmith.train.runtime import Runtime, peak_tflops, resolve_runtime, seed_everything
from tunesmith.train.trainer import Trainer

if TYPE_CHECKING:
    from tunesmith.parallel.dist import ParallelContext

log = logging.getLogger("tunesmith")

# Files whose presence marks a directory as holding a run.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "final")


@dataclass
class ModelBundle:
    family: Any
    model_cfg: Any
    model: torch.nn.Module
    tokenizer: Any


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise TunesmithError(f"output.dir {out_dir} exists and is not a directory")
    found = [m for m in RUN_MARKERS if (out_dir / m).exists()]
    if found and not overwrite:
        raise TunesmithError(
            f"output directory {out_dir} holds another run ({', '.join(found)}); "
            "choose another output.dir or set output.overwrite=true"
        )


def prepare_output_dir(out_dir: Path, cfg: RunConfig) -> None:
    """Called only once setup has succeeded: clear a previous run's records, write the config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "summary.json"):
        (out_dir / name).unlink(missing_ok=True)
    dump_config(cfg, out_dir / "config.yaml")


def has_weights(source: str) -> bool:
    """True when `source` can supply pretrained weights (a checkpoint dir, or a hub id)."""
    p = Path(source)
    if p.is_dir():
        return any(p.glob("*.safetensors")) or any(p.glob("*.bin")) or (
            p / "model.safetensors.index.json"
        ).exists()
    if p.exists():
        return False  # a bare config.json
    from tunesmith.models import is_preset

    return not is_preset(source) and "/" in source  # hub id "org/name"


def build_model_bundle(cfg: RunConfig, rt: Runtime, ctx: ParallelContext | None = None) -> ModelBundle:
    from tunesmith.data import load_tokenizer
    from tunesmith.models import resolve_model_config
    from tunesmith.parallel.dist import single_process
    from tunesmith.parallel.setup import build_parallel_model

    mc = cfg.model
    family, model_cfg = resolve_model_config(mc.name, mc.overrides)
    tok_source = mc.tokenizer or (mc.name if not _is_preset(mc.name) else None)
    if tok_source is None:
        raise TunesmithError(
            f"model.name={mc.name!r} is a preset without a tokenizer: set model.tokenizer"
        )
    tokenizer = load_tokenizer(tok_source, trust_remote_code=mc.trust_remote_code)
    if len(tokenizer) > model_cfg.vocab_size:
        raise TunesmithError(
            f"tokenizer {tok_source} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model_cfg.vocab_size}; set model.overrides.vocab_size"
        )
    pretrained = has_weights(mc.name) and not mc.from_scratch
    model = build_parallel_model(cfg, rt, ctx or single_process(), family, model_cfg, pretrained)
    return ModelBundle(family, model_cfg, model, tokenizer)


def _is_preset(name: str) -> bool:
    from tunesmith.models import is_preset

    return is_preset(name)


def build_loaders(cfg: RunConfig, tokenizer, max_positions: int, ctx: ParallelContext | None = None):
    from tunesmith.data import StatefulLoader, build_clm_datasets, make_collator
    from tunesmith.parallel.setup import main_rank_first

    with main_rank_first(ctx):  # rank 0 fills the tokenisation cache, the others read it
        train_ds, val_ds = build_clm_datasets(
            cfg.data, tokenizer, seed=cfg.train.seed, max_positions=max_positions
        )
    # Data-parallel sharding: TP ranks of one data-parallel group read the same batches.
    shard = {"rank": ctx.dp_rank, "world_size": ctx.dp_size} if ctx is not None else {}
    collate = make_collator(cfg.data, tokenizer)
    train_loader = StatefulLoader(
        train_ds, batch_size=cfg.train.micro_batch_size, collate_fn=collate, shuffle=True,
        seed=cfg.train.seed, drop_last=cfg.data.drop_last, **shard,
    )
    val_loader = None
    if val_ds is not None and len(val_ds) > 0:
        val_loader = StatefulLoader(
            val_ds, batch_size=cfg.eval.batch_size or cfg.train.micro_batch_size,
            collate_fn=collate, shuffle=False, seed=cfg.train.seed, drop_last=False, **shard,
        )
    if len(train_loader) < cfg.train.grad_accum_steps:
        raise TunesmithError(
            f"the training set gives {len(train_loader)} micro-batches per epoch, fewer than "
            f"train.grad_accum_steps={cfg.train.grad_accum_steps}: use more data or smaller batches"
        )
    return train_loader, val_loader


def build_trainer(cfg: RunConfig) -> tuple[Trainer, ModelBundle]:
    from tunesmith.models import resolve_model_config
    from tunesmith.parallel.deepspeed import apply_deepspeed
    from tunesmith.parallel.setup import start_parallel

    cfg = apply_deepspeed(cfg)
    out_dir = Path(cfg.output.dir)
    check_output_dir(out_dir, cfg.output.overwrite)
    rt = resolve_runtime(cfg.train.device, cfg.train.precision)
    # Layout checks (exit 2 on every rank, before any communication), then the process group.
    ctx, rt = start_parallel(cfg, rt, resolve_model_config(cfg.model.name, cfg.model.overrides)[1])
    seed_everything(cfg.train.seed)
    bundle = build_model_bundle(cfg, rt, ctx)  # parallelised (TP/AC/compile/FSDP2) with weights
    max_pos = bundle.model_cfg.max_position_embeddings
    train_loader, val_loader = build_loaders(cfg, bundle.tokenizer, max_pos, ctx)
    model = bundle.model
    steps_per_epoch = len(train_loader) // cfg.train.grad_accum_steps
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    optimizer = build_optimizer(model, cfg.optim, rt.device)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps, steps_per_epoch)
    seq_len = cfg.data.block_size
    trainer = Trainer(
        cfg=cfg, rt=rt, model=model, optimizer=optimizer, scheduler=scheduler,
        train_loader=train_loader, val_loader=val_loader, out_dir=out_dir,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        flops_per_token=float(model.flops_per_token(seq_len)),
        peak_tflops=peak_tflops(rt.device, cfg.logging.peak_tflops),
        scaler=rt.grad_scaler(), par=ctx,
    )
    if ctx.is_main:  # only rank 0 writes non-sharded files
        prepare_output_dir(out_dir, cfg)
    ctx.barrier()
    log.info(
        "model %s: %.2fM params on %s (%s); %d steps (%d per epoch)",
        cfg.model.name, sum(p.numel() for p in model.parameters()) / 1e6, rt.device,
        rt.precision, total_steps, steps_per_epoch,
    )
    return trainer, bundle


def run_training(cfg: RunConfig) -> dict[str, Any]:
    """The whole `tunesmith train` job. Returns the summary written to OUTPUT/summary.json."""
    from tunesmith.models import save_pretrained
    from tunesmith.train.trainer import write_summary

    trainer, bundle = build_trainer(cfg)
    summary = trainer.train()
    out_dir = Path(cfg.output.dir)
    if cfg.output.save_final:
        final = out_dir / "final"
        save = save_pretrained
        if trainer.par is not None and trainer.par.distributed:
            from tunesmith.parallel.export import save_pretrained_distributed as save
        save(bundle.model, bundle.family, bundle.model_cfg, final, tokenizer=bundle.tokenizer)
        summary["final_model"] = str(final)
    if trainer.par is None or trainer.par.is_main:
        write_summary(out_dir, summary)
    return summary

