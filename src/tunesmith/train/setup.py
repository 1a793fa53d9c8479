"""Build a `Trainer` from a `RunConfig`: output dir, runtime, tokenizer, data, model, optimizer,
checkpointing and resume.

Order matters for "nothing half-written": every check that can fail on bad input (config, data,
tokenizer, model shape, resume checkpoint, disk space) runs before anything is written to the
output directory.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tunesmith.checkpoint import CheckpointManager, check_disk, estimate_bytes
from tunesmith.config import RunConfig, dump_config
from tunesmith.errors import TunesmithError
from tunesmith.train.checkpointing import (
    Checkpointer,
    DeferredRNGState,
    hf_files_writer,
    trainer_state,
)
from tunesmith.train.guard import DIAGNOSTICS_FILE
from tunesmith.train.optim import build_optimizer, build_scheduler
from tunesmith.train.resume import (
    RunFinished,
    apply_optimizer_config,
    check_model_matches,
    check_not_finished,
    check_run_dir_matches,
    plan_resume,
    truncate_metrics,
)
from tunesmith.train.runtime import Runtime, peak_tflops, resolve_runtime, seed_everything
from tunesmith.train.special_tokens import align_special_tokens
from tunesmith.train.trainer import Trainer
from tunesmith.transforms.float8 import check_float8_device, float8_post_step

if TYPE_CHECKING:
    from tunesmith.parallel.dist import ParallelContext

log = logging.getLogger("tunesmith")

# Files whose presence marks a directory as holding a run.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "final", "checkpoints")


@dataclass
class ModelBundle:
    family: Any
    model_cfg: Any
    model: torch.nn.Module
    tokenizer: Any
    tokenizer_source: str = ""
    task: Any = None  # tunesmith.train.tasks.TaskData for sft / mlm / streaming runs


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise TunesmithError(f"output.dir {out_dir} exists and is not a directory")
    found = [m for m in RUN_MARKERS if (out_dir / m).exists()]
    if found and not overwrite:
        raise TunesmithError(
            f"output directory {out_dir} holds another run ({', '.join(found)}); resume it with "
            "checkpoint.resume=auto, choose another output.dir or set output.overwrite=true"
        )


def check_run_dir(out_dir: Path, cfg: RunConfig, checkpoint: Path | None) -> None:
    """Output-dir rules when resuming: a directory holding this same run is fine.

    Resuming from a checkpoint inside `out_dir` needs nothing more (its config was compared);
    a fresh start (`auto` found none) or a checkpoint from elsewhere must not take over a
    directory that holds a different run.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise TunesmithError(f"output.dir {out_dir} exists and is not a directory")
    inside = checkpoint is not None and out_dir.resolve() in checkpoint.resolve().parents
    if not inside:
        check_run_dir_matches(out_dir, cfg)


def prepare_output_dir(out_dir: Path, cfg: RunConfig, resume_step: int | None) -> None:
    """Called only once setup has succeeded: set up the records, write the config.

    Fresh start: a previous run's records go (and with output.overwrite its checkpoints).
    Resume: metrics.jsonl keeps the records up to the checkpoint's step and is appended to.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            for name in ("metrics.jsonl", "summary.json", DIAGNOSTICS_FILE):
                (out_dir / name).unlink(missing_ok=True)
            old = out_dir / "checkpoints"
            if cfg.output.overwrite and old.is_dir():
                log.warning("output.overwrite: removing the previous run's checkpoints in %s", old)
                shutil.rmtree(old)
        else:
            truncate_metrics(out_dir / "metrics.jsonl", resume_step)
            (out_dir / "summary.json").unlink(missing_ok=True)
        dump_config(cfg, out_dir / "config.yaml")
    except OSError as e:
        raise TunesmithError(f"cannot write to output directory {out_dir}: {e.strerror or e}") from None


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
    from tunesmith.models import is_preset, resolve_model_config
    from tunesmith.parallel.dist import single_process
    from tunesmith.parallel.setup import build_parallel_model
    from tunesmith.peft import apply_peft, fill_peft
    from tunesmith.peft import base_dtype as peft_base_dtype

    mc = cfg.model
    family, model_cfg = resolve_model_config(mc.name, mc.overrides)
    tok_source = mc.tokenizer or (mc.name if not is_preset(mc.name) else None)
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
    if family.kind == "causal":  # encoders' pad id shapes their position ids: left alone
        model_cfg = align_special_tokens(model_cfg, tokenizer, tok_source)
    pretrained = has_weights(mc.name) and not mc.from_scratch

    def peft(m: torch.nn.Module, on_meta: bool) -> None:
        # Freezing / LoRA / QLoRA, before data prep (bad targets fail fast) and before
        # parallelize compiles and shards the blocks.
        apply_peft(m, cfg.peft, rt, family, model_cfg, on_meta=on_meta)

    def adapters(m: torch.nn.Module) -> None:
        # One process: apply_peft already copied a from_checkpoint adapter (a real model).
        fill_peft(m, cfg.peft, family, model_cfg, cfg.train.seed, loaded=not sharded)

    sharded = ctx is not None and ctx.distributed
    # Parallelised (TP / AC / compile / FSDP2 or DDP) and holding its weights. A frozen PEFT
    # base is loaded straight into its storage dtype (bf16 under mixed precision).
    model = build_parallel_model(cfg, rt, ctx or single_process(), family, model_cfg, pretrained,
                                 dtype=peft_base_dtype(cfg.peft, rt), prepare=peft, fill=adapters)
    return ModelBundle(family, model_cfg, model, tokenizer, tok_source)


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
    """Everything for `Trainer.train()`, restored from a checkpoint when resuming.

    Order: output-dir rules and the resume checkpoint (config match) first, then the costly
    builds, then the checkpoint load (shapes checked), the disk check, and only then anything
    written to the output directory. RNG states are applied by `train()` itself.
    """
    from tunesmith.models import resolve_model_config
    from tunesmith.parallel.deepspeed import apply_deepspeed
    from tunesmith.parallel.setup import start_parallel

    cfg = apply_deepspeed(cfg)
    out_dir = Path(cfg.output.dir)
    ck = cfg.checkpoint
    if ck.resume is None:
        check_output_dir(out_dir, cfg.output.overwrite)
    manager = CheckpointManager(out_dir, keep_last=ck.keep_last, verify=ck.verify)
    plan = plan_resume(cfg, manager)
    if ck.resume is not None:
        check_run_dir(out_dir, cfg, plan.checkpoint)
    check_not_finished(out_dir, plan, cfg.train.max_steps)  # before any costly build
    rt = resolve_runtime(cfg.train.device, cfg.train.precision)
    check_float8_device(cfg, rt.device)  # float8 needs SM >= 8.9: refuse before any work
    # Layout checks (exit 2 on every rank, before any communication), then the process group.
    ctx, rt = start_parallel(cfg, rt, resolve_model_config(cfg.model.name, cfg.model.overrides)[1])
    manager.cleanup_partial()  # rank 0 removes, between barriers
    seed_everything(cfg.train.seed)
    bundle = build_model_bundle(cfg, rt, ctx)  # PEFT applied, then parallelised
    trainer = _make_trainer(cfg, rt, bundle, out_dir, ctx)
    if plan.checkpoint is not None and trainer.total_steps < plan.step:
        raise TunesmithError(
            f"this run has {trainer.total_steps} steps but checkpoint {plan.checkpoint} is at step "
            f"{plan.step}; raise train.epochs or train.max_steps to continue from it"
        )
    check_not_finished(out_dir, plan, trainer.total_steps)  # epoch-based runs: known only now
    trainer.resumed_from = plan.checkpoint
    rng = DeferredRNGState()
    app_state = trainer_state(trainer, rng)
    trainer.checkpointer = Checkpointer(
        cfg, manager, app_state, hf_files_writer(bundle.model_cfg, rt.param_dtype, bundle.tokenizer)
    )
    if plan.checkpoint is not None:
        _restore(trainer, manager, plan.checkpoint, app_state)
        trainer.rng_state = rng
    saves = ck.periodic or ck.save_on_exit
    check_disk(out_dir, estimate_bytes(app_state) if saves else 0)
    if ctx.is_main:  # only rank 0 writes non-sharded files
        prepare_output_dir(out_dir, cfg, plan.step if plan.checkpoint is not None else None)
    ctx.barrier()
    log.info(
        "model %s: %.2fM params on %s (%s); %d steps (%d per epoch)%s",
        cfg.model.name, sum(p.numel() for p in trainer.model.parameters()) / 1e6, rt.device,
        rt.precision, trainer.total_steps, trainer.steps_per_epoch,
        f"; resuming at step {plan.step}" if plan.checkpoint is not None else "",
    )
    return trainer, bundle


def _make_trainer(cfg: RunConfig, rt: Runtime, bundle: ModelBundle, out_dir: Path,
                  ctx: ParallelContext | None = None) -> Trainer:
    from tunesmith.models import usable_positions
    from tunesmith.parallel.setup import main_rank_first
    from tunesmith.train.tasks import build_task_data

    max_pos = usable_positions(bundle.model_cfg)
    with main_rank_first(ctx):  # rank 0 fills the tokenisation cache, the others read it
        bundle.task = build_task_data(cfg, bundle.family, bundle.tokenizer, max_pos,
                                      bundle.tokenizer_source)
    if bundle.task is None:  # plain clm
        train_loader, val_loader = build_loaders(cfg, bundle.tokenizer, max_pos, ctx)
    else:
        train_loader, val_loader = bundle.task.train_loader, bundle.task.val_loader
    model = bundle.model  # blocks already compiled by parallelize() when train.compile
    if bundle.task is None or bundle.task.sized:
        steps_per_epoch = len(train_loader) // cfg.train.grad_accum_steps
    else:  # a stream has no length: one "epoch" for the schedule is the whole run
        steps_per_epoch = cfg.train.max_steps or 1
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    # FSDP2 CPU offload: the optimizer steps on host-resident shards (no fused CUDA kernel).
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu") if cfg.parallel.cpu_offload else rt.device)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps, steps_per_epoch)
    trainer = Trainer(
        cfg=cfg, rt=rt, model=model, optimizer=optimizer, scheduler=scheduler,
        train_loader=train_loader, val_loader=val_loader, out_dir=out_dir,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        flops_per_token=float(model.flops_per_token(cfg.data.block_size)),
        peak_tflops=peak_tflops(rt.device, cfg.logging.peak_tflops),
        scaler=rt.grad_scaler(), par=ctx,
    )
    # FSDP2 float8 all-gather: the next step's weight scales, once per optimizer step.
    post = float8_post_step(model, cfg, distributed=ctx is not None and ctx.distributed)
    if post is not None:
        trainer.hooks.append(lambda _tr, _loss, _norm: post())
    return trainer


def _restore(trainer: Trainer, manager: CheckpointManager, ckpt: Path, app_state: dict) -> None:
    """Load every piece of training state from `ckpt` into the freshly built trainer."""
    check_model_matches(ckpt, trainer.model, app_state["model"].state_dict())
    live_groups = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
    rng = app_state["rng"]
    saved_world = int(manager.read_manifest(ckpt).get("world_size", 1))
    par = trainer.par
    if par is not None and par.world_size > saved_world and isinstance(rng, DeferredRNGState):
        rng.source_rank = par.rank % saved_world  # more ranks than saved: reuse a saved stream
    try:
        manager.load(ckpt, app_state)
    finally:
        if isinstance(rng, DeferredRNGState):
            rng.source_rank = None
    apply_optimizer_config(trainer.optimizer, trainer.scheduler, live_groups)


def run_training(cfg: RunConfig) -> dict[str, Any]:
    """The whole `tunesmith train` job. Returns the summary written to OUTPUT/summary.json.

    A run stopped by SIGTERM/SIGINT returns normally with `summary["interrupted"] = True` and
    no final model (its state is in the checkpoint). A NaN halt raises `NonFiniteError`.
    """
    from tunesmith.models import save_pretrained
    from tunesmith.train.trainer import write_summary

    try:
        trainer, bundle = build_trainer(cfg)
    except RunFinished as done:
        log.warning("%s", done)
        return json.loads(done.summary_path.read_text(encoding="utf-8"))
    summary = trainer.train()
    if bundle.task is not None:
        from tunesmith.train.tasks import after_training

        after_training(cfg, trainer, bundle, summary)
    out_dir = Path(cfg.output.dir)
    if cfg.output.save_final and not summary["interrupted"]:
        from tunesmith.peft import is_peft_model, save_final

        final = out_dir / "final"
        distributed = trainer.par is not None and trainer.par.distributed
        if is_peft_model(bundle.model):  # the adapter in PEFT format (+ merged model if asked)
            summary.update(save_final(bundle.model, bundle.family, bundle.model_cfg, cfg, out_dir,
                                      bundle.tokenizer))
        elif distributed:  # gathered tensor by tensor from the shards, rank 0 writes
            from tunesmith.parallel.export import save_pretrained_distributed

            save_pretrained_distributed(bundle.model, bundle.family, bundle.model_cfg, final,
                                        tokenizer=bundle.tokenizer)
            summary["final_model"] = str(final)
        else:
            save_pretrained(bundle.model, bundle.family, bundle.model_cfg, final, tokenizer=bundle.tokenizer)
            summary["final_model"] = str(final)
    if trainer.par is None or trainer.par.is_main:
        write_summary(out_dir, summary)
    return summary
