"""Build a `Trainer` from a `RunConfig`: output dir, runtime, tokenizer, data, model, optimizer.

Order matters for "nothing half-written": every check that can fail on bad input (config, data,
tokenizer, model shape) runs before anything is written to the output directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import RunConfig, dump_config
from tunesmith.errors import TunesmithError
from tunesmith.train.optim import build_optimizer, build_scheduler
from tunesmith.train.runtime import Runtime, peak_tflops, resolve_runtime, seed_everything
from tunesmith.train.trainer import Trainer

log = logging.getLogger("tunesmith")

# Files whose presence marks a directory as holding a run.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "final")


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


def build_model_bundle(cfg: RunConfig, rt: Runtime) -> ModelBundle:
    from tunesmith.data import load_tokenizer
    from tunesmith.models import build_model, init_random, load_pretrained, resolve_model_config

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
    model = build_model(family, model_cfg, device="meta")
    if has_weights(mc.name) and not mc.from_scratch:
        load_pretrained(model, mc.name, device=rt.device, dtype=rt.param_dtype)
    else:
        init_random(model, device=rt.device, dtype=rt.param_dtype, seed=cfg.train.seed)
    return ModelBundle(family, model_cfg, model, tokenizer, tok_source)


def _is_preset(name: str) -> bool:
    from tunesmith.models import is_preset

    return is_preset(name)


def build_loaders(cfg: RunConfig, tokenizer, max_positions: int):
    from tunesmith.data import StatefulLoader, build_clm_datasets, make_collator

    train_ds, val_ds = build_clm_datasets(
        cfg.data, tokenizer, seed=cfg.train.seed, max_positions=max_positions
    )
    collate = make_collator(cfg.data, tokenizer)
    train_loader = StatefulLoader(
        train_ds, batch_size=cfg.train.micro_batch_size, collate_fn=collate, shuffle=True,
        seed=cfg.train.seed, drop_last=cfg.data.drop_last,
    )
    val_loader = None
    if val_ds is not None and len(val_ds) > 0:
        val_loader = StatefulLoader(
            val_ds, batch_size=cfg.eval.batch_size or cfg.train.micro_batch_size,
            collate_fn=collate, shuffle=False, seed=cfg.train.seed, drop_last=False,
        )
    if len(train_loader) < cfg.train.grad_accum_steps:
        raise TunesmithError(
            f"the training set gives {len(train_loader)} micro-batches per epoch, fewer than "
            f"train.grad_accum_steps={cfg.train.grad_accum_steps}: use more data or smaller batches"
        )
    return train_loader, val_loader


def build_trainer(cfg: RunConfig) -> tuple[Trainer, ModelBundle]:
    out_dir = Path(cfg.output.dir)
    check_output_dir(out_dir, cfg.output.overwrite)
    rt = resolve_runtime(cfg.train.device, cfg.train.precision)
    seed_everything(cfg.train.seed)
    bundle = build_model_bundle(cfg, rt)
    from tunesmith.models import usable_positions
    from tunesmith.train.tasks import build_task_data

    max_pos = usable_positions(bundle.model_cfg)
    bundle.task = build_task_data(cfg, bundle.family, bundle.tokenizer, max_pos,
                                  bundle.tokenizer_source)
    if bundle.task is None:  # plain clm
        train_loader, val_loader = build_loaders(cfg, bundle.tokenizer, max_pos)
    else:
        train_loader, val_loader = bundle.task.train_loader, bundle.task.val_loader
    model = bundle.model
    if cfg.train.compile:
        # Regional compile: each block compiled in place (state-dict keys unchanged); blocks
        # share one graph, so compile time does not grow with depth.
        for block in model.layers:
            block.compile()
    if bundle.task is None or bundle.task.sized:
        steps_per_epoch = len(train_loader) // cfg.train.grad_accum_steps
    else:  # a stream has no length: one "epoch" for the schedule is the whole run
        steps_per_epoch = cfg.train.max_steps or 1
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
        scaler=rt.grad_scaler(),
    )
    prepare_output_dir(out_dir, cfg)
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
    if bundle.task is not None:
        from tunesmith.train.tasks import after_training

        after_training(cfg, trainer, bundle, summary)
    out_dir = Path(cfg.output.dir)
    if cfg.output.save_final:
        final = out_dir / "final"
        save_pretrained(bundle.model, bundle.family, bundle.model_cfg, final, tokenizer=bundle.tokenizer)
        summary["final_model"] = str(final)
    write_summary(out_dir, summary)
    return summary

