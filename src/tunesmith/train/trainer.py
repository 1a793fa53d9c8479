"""The training loop: `train -> train_step -> forward_backward`, plus `evaluate`.

Everything here runs on objects built once by `tunesmith.train.setup`; the loop itself makes no
decisions about devices or precision. Host syncs (`.item()`) happen only on logging/eval steps.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config.schema import RunConfig
from tunesmith.eval.perplexity import evaluate_loss
from tunesmith.parallel.grad import clip_grad_norm_
from tunesmith.train.forward import batch_loss_sum
from tunesmith.train.loss import IGNORE_INDEX
from tunesmith.train.metrics import MetricsWriter, Throughput, peak_memory_gib
from tunesmith.train.progress import ProgressReporter
from tunesmith.train.runtime import Runtime

log = logging.getLogger("tunesmith")


@dataclass
class Progress:
    """Where the run is; saved in checkpoints so a resume continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, sd: dict[str, int]) -> None:
        for k, v in sd.items():
            setattr(self, k, int(v))


@dataclass
class Trainer:
    cfg: RunConfig
    rt: Runtime
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: Any  # tunesmith.data.StatefulLoader
    val_loader: Any | None
    out_dir: Path
    total_steps: int
    steps_per_epoch: int
    flops_per_token: float
    peak_tflops: float | None
    scaler: torch.amp.GradScaler | None = None
    progress: Progress = field(default_factory=Progress)
    hooks: list = field(default_factory=list)  # callables(trainer, step_result) after each step
    par: Any = None  # tunesmith.parallel.dist.ParallelContext; None: one process

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        metrics = MetricsWriter(self.out_dir / "metrics.jsonl", enabled=self._is_main)
        tput = Throughput(cfg.train.throughput_warmup_steps, self.flops_per_token, self.peak_tflops)
        reporter = ProgressReporter(self.total_steps, enabled=cfg.logging.progress and self._is_main)
        start_eval = self.evaluate() if cfg.eval.at_start and self.val_loader is not None else None
        if start_eval:
            metrics.write({"step": self.progress.step, **start_eval})
            reporter.note(f"eval before training: loss {start_eval['eval_loss']:.4f}, "
                          f"perplexity {start_eval['perplexity']:.2f}")
        t_start = time.perf_counter()
        loss_acc, n_acc, last_loss, eval_out = None, 0, None, None
        reporter.start(self.progress.step)
        try:
            for micro_batches in self._step_batches():
                loss, grad_norm, tokens, samples = self.train_step(micro_batches)
                tput.step(tokens, samples)
                loss_acc = loss if loss_acc is None else loss_acc + loss
                n_acc += 1
                step = self.progress.step
                for hook in self.hooks:
                    hook(self, loss, grad_norm)
                if step % cfg.logging.steps == 0 or step == self.total_steps:
                    last_loss = (loss_acc / n_acc).item()
                    record = self._log_record(last_loss, grad_norm, tput)
                    metrics.write(record)
                    reporter.update(step, record)
                    loss_acc, n_acc = None, 0
                else:
                    reporter.advance(step)
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != self.total_steps:
                    eval_out = self._eval_and_log(metrics, reporter)
            if cfg.eval.at_end and self.val_loader is not None:
                eval_out = self._eval_and_log(metrics, reporter)
        finally:
            reporter.stop()
            metrics.close()
        return self._summary(t_start, tput, last_loss, eval_out, start_eval)

    def _step_batches(self):
        """Yield lists of `grad_accum_steps` micro-batches until total_steps, across epochs."""
        k = self.cfg.train.grad_accum_steps
        while self.progress.step < self.total_steps:
            self.train_loader.set_epoch(self.progress.epoch)
            group: list[dict] = []
            for batch in self.train_loader:
                group.append(batch)
                if len(group) == k:
                    yield group
                    group = []
                    if self.progress.step >= self.total_steps:
                        return
            # Micro-batches left over at the end of an epoch (fewer than k) are dropped so
            # every step has the same number of micro-batches.
            self.progress.epoch += 1

    def train_step(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """One optimizer step over k micro-batches; returns device tensors (no host sync)."""
        # Count targets on the host tensors before they move: the loss is normalised by the
        # total count across all micro-batches *and data-parallel ranks*, so k accumulated
        # micro-batches on N ranks give exactly the gradient of one kN-times larger batch.
        n_targets = self._global_count(
            sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches))
        tokens = sum(_count_tokens(mb) for mb in micro_batches)
        samples = sum(mb["input_ids"].size(0) for mb in micro_batches)
        # DDP/FSDP average gradients over the dp ranks; dividing by count / dp undoes that.
        dp = self.par.dp_size if self.par is not None else 1
        loss_sum = torch.zeros((), device=self.rt.device)
        for mb in micro_batches:
            loss_sum += self.forward_backward(mb, max(n_targets, 1) / dp)
        grad_norm = self._clip_and_step()
        self.progress.step += 1
        self.progress.tokens_seen += tokens * dp
        if self.par is not None:
            self.par.all_reduce_dp(loss_sum)  # the logged loss is the global batch's
        return loss_sum / max(n_targets, 1), grad_norm, tokens * dp, samples * dp

    @property
    def _is_main(self) -> bool:
        return self.par is None or self.par.is_main

    def _global_count(self, local: int) -> int:
        """`local` summed over data-parallel ranks (one tiny all-reduce per step)."""
        if self.par is None or self.par.dp_size == 1:
            return local
        t = torch.tensor(float(local), dtype=torch.float64, device=self.rt.device)
        return int(self.par.all_reduce_dp(t).item())

    def forward_backward(self, batch: dict, n_targets: float) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns its detached loss *sum*."""
        loss_sum = batch_loss_sum(self.model, batch, self.rt, need_grad=True)
        scaled = loss_sum / n_targets
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        return loss_sum.detach()

    def _clip_and_step(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.max_grad_norm
        # DTensor-aware (FSDP2/TP shards): the norm of the full gradients, the same on all ranks.
        grad_norm = clip_grad_norm_(params, max_norm if max_norm else math.inf)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    # ------------------------------------------------------------------ eval
    def evaluate(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        reduce = self.par.all_reduce_dp if self.par is not None else None
        return evaluate_loss(self.model, self.val_loader, self.rt, self.cfg.eval.max_batches, reduce)

    def _eval_and_log(self, metrics: MetricsWriter, reporter: ProgressReporter) -> dict[str, float]:
        out = self.evaluate()
        metrics.write({"step": self.progress.step, **out})
        reporter.note(f"step {self.progress.step}: eval loss {out['eval_loss']:.4f}, "
                      f"perplexity {out['perplexity']:.2f}")
        return out

    # ------------------------------------------------------------------ records
    def _log_record(self, loss: float, grad_norm: torch.Tensor, tput: Throughput) -> dict[str, Any]:
        tps = tput.tokens_per_s()
        return {
            "step": self.progress.step,
            "epoch": self.progress.epoch,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tps,
            "mfu": tput.mfu(tps),
            "peak_mem_gib": peak_memory_gib(self.rt.device),
            "tokens_seen": self.progress.tokens_seen,
        }

    def _summary(self, t_start, tput, last_loss, eval_out, start_eval) -> dict[str, Any]:
        tps = tput.tokens_per_s()
        elapsed = tput.elapsed()
        summary = {
            "runtime_s": time.perf_counter() - t_start,
            "steps": self.progress.step,
            "tokens_seen": self.progress.tokens_seen,
            "train_samples_per_s": tput.samples / elapsed if elapsed > 0 else None,
            "tokens_per_s": tps,
            "mfu": tput.mfu(tps),
            "peak_mem_gib": peak_memory_gib(self.rt.device),
            "train_loss": last_loss,
            "device": str(self.rt.device),
            "precision": self.rt.precision,
        }
        if start_eval:
            summary["eval_loss_start"] = start_eval["eval_loss"]
            summary["perplexity_start"] = start_eval["perplexity"]
        if eval_out:
            summary.update(eval_out)
        return summary


def _count_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "summary.json")
