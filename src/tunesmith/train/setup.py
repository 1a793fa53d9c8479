"""Build a `Trainer` from a `RunConfig`: output dir, resume plan, the assembled model
(`tunesmith.build`), the task's loaders (`tunesmith.data.assembly`), checkpointing and restore.

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
from typing import Any

import torch
from torch import nn

from tunesmith.build import Assembly, ModelSpec, assemble, build_reference
from tunesmith.checkpoint import CheckpointManager, Stateful, check_disk, estimate_bytes
from tunesmith.config import RunConfig, dump_config
from tunesmith.config.deepspeed import apply_deepspeed
from tunesmith.data.assembly import Shard, TaskData, build_task_data
from tunesmith.errors import TunesmithError
from tunesmith.objective.forward import TokenObjective
from tunesmith.objective.preference import PreferenceObjective
from tunesmith.objective.reference_table import precompute
from tunesmith.objective.router_aux import RouterAuxObjective
from tunesmith.observe import check_trackers
from tunesmith.optim import build_scheduler
from tunesmith.parallel.dist import ParallelContext, main_rank_first
from tunesmith.peft import adapters_disabled, switchable_adapters
from tunesmith.runtime import peak_tflops, precision_note
from tunesmith.train.checkpointing import (
    Checkpointer,
    DeferredRNGState,
    hf_files_writer,
    trainer_state,
)
from tunesmith.train.finish import after_training, save_final_model
from tunesmith.train.guard import DIAGNOSTICS_FILE
from tunesmith.train.metrics import LossWindow
from tunesmith.train.resume import (
    ResumePlan,
    RunFinished,
    apply_optimizer_config,
    check_model_matches,
    check_not_finished,
    check_run_dir_matches,
    plan_resume,
    truncate_metrics,
)
from tunesmith.train.trainer import Progress, Trainer, write_summary
from tunesmith.transforms.float8 import float8_post_step

log = logging.getLogger("tunesmith")

# Files whose presence marks a directory as holding a run.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "final", "checkpoints")


@dataclass(frozen=True)
class RunParts:
    """What the end of a run needs besides the trainer: the model spec and the task's data."""

    spec: ModelSpec
    model: nn.Module
    task: TaskData

    @property
    def tokenizer(self) -> Any:
        return self.spec.tokenizer


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


def build_trainer(cfg: RunConfig) -> tuple[Trainer, RunParts]:
    """Everything for `Trainer.train()`, restored from a checkpoint when resuming.

    Order: output-dir rules and the resume checkpoint (config match) first, then the costly
    builds (the assembly pipeline, then the data), then the checkpoint load (shapes checked),
    the disk check, and only then anything written to the output directory. RNG states are
    applied by `train()` itself.
    """
    cfg = apply_deepspeed(cfg)
    check_trackers(cfg.logging)  # a missing tracker library fails before any work
    out_dir = Path(cfg.output.dir)
    ck = cfg.checkpoint
    if ck.resume is None:
        check_output_dir(out_dir, cfg.output.overwrite)
    manager = CheckpointManager(out_dir, keep_last=ck.keep_last, verify=ck.verify)
    plan = plan_resume(cfg, manager)
    if ck.resume is not None:
        check_run_dir(out_dir, cfg, plan.checkpoint)
    check_not_finished(out_dir, plan, cfg.train.max_steps)  # before any costly build
    asm = assemble(cfg)  # runtime -> spec -> processes -> ... -> optimizer (tunesmith.build)
    ctx: ParallelContext = asm.need("ctx")
    manager.cleanup_partial()  # rank 0 removes, between barriers
    spec: ModelSpec = asm.need("spec")
    with main_rank_first(ctx):  # rank 0 fills the tokenisation cache, the others read it
        task = build_task_data(cfg, spec.family, spec.tokenizer, spec.max_positions,
                               spec.tokenizer_source, Shard(ctx.dp_rank, ctx.dp_size))
    trainer = _make_trainer(cfg, asm, task, out_dir, manager, plan)
    saves = ck.periodic or ck.save_on_exit
    assert trainer.checkpointer is not None
    check_disk(out_dir, estimate_bytes(trainer.checkpointer.app_state) if saves else 0)
    if ctx.is_main:  # only rank 0 writes non-sharded files
        prepare_output_dir(out_dir, cfg, plan.step if plan.checkpoint is not None else None)
    ctx.barrier()
    log.info(
        "model %s: %.2fM params on %s (%s); %d steps (%d per epoch)%s",
        cfg.model.name, sum(p.numel() for p in trainer.model.parameters()) / 1e6, trainer.rt.device,
        precision_note(cfg.train.precision, trainer.rt), trainer.total_steps, trainer.steps_per_epoch,
        f"; resuming at step {plan.step}" if plan.checkpoint is not None else "",
    )
    return trainer, RunParts(spec, trainer.model, task)


def build_objective(cfg: RunConfig, asm: Assembly, task: TaskData | None = None) -> Any:
    """The trainer's objective: token cross-entropy, or for task=dpo the preference loss with its
    reference policy, the policy the run starts from:
      * SimPO: none;
      * LoRA / DoRA / QLoRA: the same model with its adapters switched off (no second copy);
      * otherwise a frozen copy of `model.name`'s weights in the compute dtype, compiled and
        sharded as the policy is (`build.build_reference`), never the resumed weights, so a
        resumed run compares with the same reference as an uninterrupted one.
    With dpo.precompute_reference the reference scores `task`'s pairs once here and is then
    dropped (`_precompute_reference`)."""
    if cfg.task != "dpo" and cfg.train.router_aux_loss_coef is not None:
        return RouterAuxObjective(cfg.train.router_aux_loss_coef)  # MoE only (checked in layout)
    if cfg.task != "dpo":
        return TokenObjective()
    dc, model = cfg.dpo, asm.need("model")
    if not dc.uses_reference:
        return PreferenceObjective(dc)
    if switchable_adapters(model):
        objective = PreferenceObjective(dc, adapters_off=lambda: adapters_disabled(model))
        return _precompute_reference(objective, model, asm, task) if dc.precompute_reference else objective
    spec, rt = asm.need("spec"), asm.need("rt")
    if not spec.pretrained:
        raise TunesmithError(
            f"task=dpo with dpo.loss={dc.loss} compares with the starting policy, so model.name must "
            f"hold pretrained weights ({spec.source!r} has none); or use dpo.loss=simpo (no reference)")
    reference = build_reference(asm)
    log.info("dpo: reference policy = a frozen copy of %s (%s%s)", spec.source, rt.compute_dtype,
             ", sharded like the policy" if asm.need("ctx").layout.sharded else "")
    objective = PreferenceObjective(dc, reference=reference)
    return _precompute_reference(objective, model, asm, task) if dc.precompute_reference else objective


def _precompute_reference(objective: PreferenceObjective, model: nn.Module, asm: Assembly,
                          task: TaskData | None) -> PreferenceObjective:
    """Score the training and validation pairs with the reference once (this rank's shards, in
    dataset order, gathered over the data-parallel ranks), then keep only the log-probs: the
    frozen copy of a full fine-tune is released. Every rank runs the same number of batches."""
    if task is None or not task.sized:
        raise TunesmithError("dpo.precompute_reference needs the preference data in memory")
    loaders = [task.train_loader.in_order()]
    if task.val_loader is not None:
        loaders.append(task.val_loader)
    rt = asm.need("rt")
    table, seconds = precompute(lambda batch: objective.reference_logps(model, batch, rt), loaders,
                                asm.need("ctx").all_gather_dp)
    released = objective.use_table(table)
    log.info("dpo: reference log-probs precomputed for %d rows in %.1f s; no reference forward "
             "during training%s", len(table), seconds,
             " (the frozen reference copy is released)" if released else "")
    return objective


def _schedule_steps(cfg: RunConfig, task: TaskData) -> tuple[int, int]:
    """(steps per epoch, total steps) of the run."""
    if task.sized:
        steps_per_epoch = len(task.train_loader) // cfg.train.grad_accum_steps  # type: ignore[arg-type]
    else:  # a stream has no length: one "epoch" for the schedule is the whole run
        steps_per_epoch = cfg.train.max_steps or 1
    return steps_per_epoch, cfg.train.max_steps or steps_per_epoch * cfg.train.epochs


def _make_trainer(cfg: RunConfig, asm: Assembly, task: TaskData, out_dir: Path,
                  manager: CheckpointManager, plan: ResumePlan) -> Trainer:
    """The trainer with every field given at construction, its state restored when resuming."""
    rt, model, optimizer, spec = asm.need("rt"), asm.need("model"), asm.need("optimizer"), asm.need("spec")
    steps_per_epoch, total_steps = _schedule_steps(cfg, task)
    if plan.checkpoint is not None and total_steps < plan.step:
        raise TunesmithError(
            f"this run has {total_steps} steps but checkpoint {plan.checkpoint} is at step "
            f"{plan.step}; raise train.epochs or train.max_steps to continue from it"
        )
    check_not_finished(out_dir, plan, total_steps)  # epoch-based runs: known only now
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps, steps_per_epoch)
    scaler, progress, window = rt.grad_scaler(), Progress(), LossWindow()
    rng = DeferredRNGState()
    app_state = trainer_state(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                              progress=progress, window=window, loader=task.train_loader,
                              device=rt.device, rng=rng)
    checkpointer = Checkpointer(cfg, manager, app_state,
                                hf_files_writer(spec.model_cfg, rt.param_dtype, spec.tokenizer))
    if plan.checkpoint is not None:
        _restore(manager, plan.checkpoint, app_state, model, optimizer, scheduler, asm.need("ctx"))
    ctx: ParallelContext = asm.need("ctx")
    # FSDP2 float8 all-gather: the next step's weight scales, once per optimizer step.
    post = float8_post_step(model, cfg, distributed=ctx.distributed)
    hooks = [lambda _tr, _loss, _norm: post()] if post is not None else []
    return Trainer(
        cfg=cfg, rt=rt, model=model, optimizer=optimizer, scheduler=scheduler,
        train_loader=task.train_loader, val_loader=task.val_loader, out_dir=out_dir,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        flops_per_token=float(model.flops_per_token(cfg.data.block_size)),
        peak_tflops=peak_tflops(rt.device, cfg.logging.peak_tflops), scaler=scaler,
        progress=progress, window=window, hooks=hooks, checkpointer=checkpointer,
        resumed_from=plan.checkpoint, rng_state=rng if plan.checkpoint is not None else None,
        par=ctx, objective=build_objective(cfg, asm, task),
    )


def _restore(manager: CheckpointManager, ckpt: Path, app_state: dict[str, Stateful], model: nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
             par: ParallelContext) -> None:
    """Load every piece of training state from `ckpt` into the freshly built objects."""
    check_model_matches(ckpt, model, app_state["model"].state_dict())
    live_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    rng = app_state["rng"]
    saved_world = int(manager.read_manifest(ckpt).get("world_size", 1))
    if par.world_size > saved_world and isinstance(rng, DeferredRNGState):
        rng.source_rank = par.rank % saved_world  # more ranks than saved: reuse a saved stream
    try:
        manager.load(ckpt, app_state)
    finally:
        if isinstance(rng, DeferredRNGState):
            rng.source_rank = None
    apply_optimizer_config(optimizer, scheduler, live_groups)


def run_training(cfg: RunConfig) -> dict[str, Any]:
    """The whole `tunesmith train` job. Returns the summary written to OUTPUT/summary.json.

    A run stopped by SIGTERM/SIGINT returns normally with `summary["interrupted"] = True` and
    no final model (its state is in the checkpoint). A NaN halt raises `NonFiniteError`.
    """
    try:
        trainer, parts = build_trainer(cfg)
    except RunFinished as done:  # resuming at the last step of a completed run: touch nothing
        log.warning("%s", done)
        return json.loads(done.summary_path.read_text(encoding="utf-8"))
    summary = trainer.train()
    after_training(cfg, trainer, parts, summary)
    out_dir = Path(cfg.output.dir)
    if cfg.output.save_final and not summary["interrupted"]:
        summary.update(save_final_model(cfg, trainer, parts, out_dir))
    # Trackers get the summary (and OUTPUT/final with logging.log_model); report.html is written.
    trainer.observer.finish(summary, out_dir / "final")
    if trainer.par is None or trainer.par.is_main:
        write_summary(out_dir, summary)
    return summary
