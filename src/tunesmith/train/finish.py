"""The end of a training run: the task's extras for the summary and the final model.

    after_training     data counts, and evaluation by generation (task=sft, eval.generate)
    save_final_model   OUTPUT/final: a PEFT adapter (+ merged model), or the HF model dir,
                       gathered from the shards when the run is distributed
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.config import RunConfig
from tunesmith.eval.generation import evaluate_generation
from tunesmith.models.io import save_pretrained
from tunesmith.parallel.export import save_pretrained_distributed
from tunesmith.peft import is_peft_model, save_final

if TYPE_CHECKING:
    from tunesmith.train.setup import RunParts
    from tunesmith.train.trainer import Trainer

log = logging.getLogger("tunesmith")


def _stats_dict(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in stats.items()}


def after_training(cfg: RunConfig, trainer: Trainer, parts: RunParts, summary: dict[str, Any]) -> None:
    """Task extras for the run summary: data counts, and evaluation by generation."""
    task = parts.task
    if task.stats:
        summary["data"] = _stats_dict(task.stats)
    g = cfg.eval.generate
    if not g.enabled:
        return
    if not task.val_rendered or task.formatter is None:
        log.warning("eval.generate: no held-out SFT records (set data.validation_path or "
                    "data.validation_split_percentage); skipped")
        return
    scores = evaluate_generation(
        parts.model, parts.tokenizer, task.val_rendered,
        task.formatter.stop_ids(parts.tokenizer),
        max_new_tokens=g.max_new_tokens, max_positions=parts.spec.max_positions,
        out_path=Path(cfg.output.dir) / g.output, max_samples=g.max_samples,
        temperature=g.temperature, seed=cfg.train.seed, autocast=trainer.rt.autocast(),
        batch_size=g.batch_size, cuda_graphs=g.cuda_graphs,
    )
    summary.update({f"gen_{k}": v for k, v in scores.items()})
    summary["predictions"] = str(Path(cfg.output.dir) / g.output)


def save_final_model(cfg: RunConfig, trainer: Trainer, parts: RunParts, out_dir: Path) -> dict[str, str]:
    """Write OUTPUT/final; returns the summary entries naming what was written."""
    final = out_dir / "final"
    spec = parts.spec
    if is_peft_model(parts.model):  # the adapter in PEFT format (+ merged model if asked)
        return save_final(parts.model, spec.family, spec.model_cfg, cfg, out_dir, spec.tokenizer)
    if trainer.par is not None and trainer.par.distributed:  # gathered tensor by tensor, rank 0 writes
        save_pretrained_distributed(parts.model, spec.family, spec.model_cfg, final,
                                    tokenizer=spec.tokenizer)
    else:
        save_pretrained(parts.model, spec.family, spec.model_cfg, final, tokenizer=spec.tokenizer)
    return {"final_model": str(final)}
