"""The training loop: `train -> train_step -> forward_backward`, plus `evaluate`.

Everything here runs on objects built once by `tunesmith.train.setup`; the loop itself makes no
decisions about devices or precision. Host syncs (`.item()`) happen only on logging/eval/checkpoint
steps, plus one per step for the NaN guard where the device cannot skip an update by itself
(see `tunesmith.train.guard`). Checkpoints are taken at step boundaries (`Checkpointer.due`),
and a SIGTERM/SIGINT stops the loop at the next one (`tunesmith.train.preempt`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config.schema import RunConfig
from tunesmith.data.loader import StatefulLoader
from tunesmith.data.streaming import StreamingLoader
from tunesmith.errors import TunesmithError
from tunesmith.eval.perplexity import evaluate_loss
from tunesmith.hf.files import replace_text
from tunesmith.observe import RunObserver
from tunesmith.objective.forward import TokenObjective
from tunesmith.objective.preference import evaluate_preferences
from tunesmith.parallel.dist import ParallelContext
from tunesmith.parallel.grad import clip_grads_with_norm_, clip_scale, settle_partial_grads
from tunesmith.parallel.grad import grad_norms as dist_grad_norms
from tunesmith.runtime import Runtime
from tunesmith.train.checkpointing import Checkpointer, DeferredRNGState
from tunesmith.train.guard import NonFiniteGuard, grad_norms
from tunesmith.train.metrics import LossWindow, MetricsWriter, Throughput, peak_memory_gib
from tunesmith.train.preempt import StopRequest
from tunesmith.train.progress import ProgressReporter

log = logging.getLogger("tunesmith")


@dataclass
class Progress:
    """Where the run is; saved in checkpoints so a resume continues exactly."""

    step: int = 0  # optimizer steps done (skipped steps included)
    epoch: int = 0  # the epoch the next batch comes from
    tokens_seen: int = 0
    skipped_steps: int = 0  # steps whose update was dropped by the NaN guard
    consecutive_skips: int = 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, sd: dict[str, int]) -> None:
        for k, v in sd.items():
            setattr(self, k, int(v))


@dataclass
class _Loop:
    """What one `train()` call accumulates for its summary."""

    last_loss: float | None = None
    eval_out: dict[str, float] | None = None
    start_eval: dict[str, float] | None = None
    stopped_by: str | None = None  # signal name when preempted


StepHook = Callable[["Trainer", torch.Tensor, torch.Tensor], None]  # (trainer, loss, grad_norm)


@dataclass
class Trainer:
    """The loop's inputs, all given at construction (see `tunesmith.train.setup`)."""

    cfg: RunConfig
    rt: Runtime
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: StatefulLoader | StreamingLoader
    val_loader: StatefulLoader | None
    out_dir: Path
    total_steps: int
    steps_per_epoch: int
    flops_per_token: float
    peak_tflops: float | None
    scaler: torch.amp.GradScaler | None = None
    progress: Progress = field(default_factory=Progress)
    window: LossWindow = field(default_factory=LossWindow)  # losses since the last log record
    hooks: list[StepHook] = field(default_factory=list)  # called after each step
    checkpointer: Checkpointer | None = None  # None: never save
    resumed_from: Path | None = None
    rng_state: DeferredRNGState | None = None  # restored from a checkpoint, applied in train()
    par: ParallelContext | None = None  # None: one process
    observer: RunObserver | None = None  # trackers, profiler, report; built by train() when None
    bundle: Any = None  # tunesmith.train.setup.RunParts (spec, tokenizer, task data)
    # What a micro-batch's loss is and what it is normalised by: target tokens (TokenObjective)
    # or preference pairs (objective.preference.PreferenceObjective, task=dpo).
    objective: Any = field(default_factory=TokenObjective)

    @classmethod
    def from_config(cls, recipe: Any = None, **overrides: Any) -> Trainer:
        """A Trainer built from a recipe, ready for `.train()` (which returns the summary).

        `recipe`: a YAML path, a dict shaped like one, or a `RunConfig`; `overrides`: keyword
        arguments such as `optim={"lr": 3e-4}` or `train__max_steps=10` (see
        `tunesmith.build_config`). The model, data, optimizer and checkpointing are built as
        `tunesmith train` builds them; `trainer.model`, `trainer.bundle.tokenizer` are usable
        before training. `.train()` trains and evaluates; the final HF model is written by
        `tunesmith.train(...)`, which runs the whole job. Raises `TunesmithError` subclasses.
        """
        from tunesmith.config.resolve import build_config
        from tunesmith.train.setup import build_trainer

        trainer, bundle = build_trainer(build_config(recipe, **overrides))
        trainer.bundle = bundle
        return trainer

    def __post_init__(self) -> None:
        tc = self.cfg.train
        self.guard = NonFiniteGuard(
            tc.nan_policy, tc.max_consecutive_skips, self.progress, self.out_dir,
            # Sharded (DTensor) params too: the fused kernels take found_inf and grad_scale as
            # plain tensors, and every rank computes the same flag from the global norm.
            deferred=NonFiniteGuard.can_defer(self.optimizer, self.scaler is not None),
            check_grad_norm=self.scaler is None,
        )
        self._data_epoch = self.progress.epoch

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Run to `total_steps` (or a stop signal); returns the summary. Raises NonFiniteError."""
        cfg = self.cfg
        metrics = MetricsWriter(self.out_dir / "metrics.jsonl", enabled=self._is_main)
        tput = self._tput = Throughput(cfg.train.throughput_warmup_steps, self.flops_per_token,
                                       self.peak_tflops, self.rt.device)
        obs = self.observer = self.observer or self._make_observer()
        reporter = ProgressReporter(self.total_steps, enabled=cfg.logging.progress, muted=not self._is_main)
        loop = _Loop()
        t_start = time.perf_counter()
        try:
            obs.start(self.progress.step, self.resumed_from, self._resume_meta())
            if cfg.eval.at_start and self.val_loader is not None and self.resumed_from is None:
                loop.start_eval = self._eval_and_log(metrics, reporter, "eval before training")
            reporter.start(self.progress.step)
            if self.rng_state is not None:
                self.rng_state.apply()  # after every other RNG consumer: the next draw is exact
            with StopRequest() as stop:
                self._run_steps(metrics, reporter, tput, stop, loop)
                self.guard.flush()
                if stop.requested:
                    self._stop(stop.name, loop)
            if loop.stopped_by is None and cfg.eval.at_end and self.val_loader is not None:
                loop.eval_out = self._eval_and_log(metrics, reporter)
        except BaseException as e:
            obs.abort(e)  # tracker runs closed as failed, report still written
            raise
        finally:
            reporter.stop()
            metrics.close()
        return self._summary(t_start, tput, loop)

    def _run_steps(self, metrics: MetricsWriter, reporter: ProgressReporter, tput: Throughput,
                   stop: StopRequest, loop: _Loop) -> None:
        cfg = self.cfg
        for micro_batches, epoch_end in self._step_batches():
            with self.observer.step(self.progress.step + 1, tput) as watch:
                loss, grad_norm, tokens, samples = self.train_step(micro_batches)
                watch.tokens = tokens
            tput.step(tokens, samples, counted=not watch.instrumented)
            self.window.add(loss, self.guard.last_ok)
            step = self.progress.step
            for hook in self.hooks:
                hook(self, loss, grad_norm)
            last = step == self.total_steps
            if step % cfg.logging.steps == 0 or last:
                self.guard.flush()  # this step syncs for the record anyway: exact skip count
                loop.last_loss = self.window.pop_mean()
                record = self.observer.record(self._log_record(loop.last_loss, grad_norm, tput))
                metrics.write(record)
                self.observer.log(record)
                reporter.update(step, record)
            else:
                reporter.advance(step)
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and not last:
                loop.eval_out = self._eval_and_log(metrics, reporter)
            if self.checkpointer is not None and self.checkpointer.due(step, epoch_end, last):
                self.save_checkpoint()
            if stop.requested:
                return

    def _stop(self, signal_name: str | None, loop: _Loop) -> None:
        """Preempted: checkpoint at this step boundary (unless disabled) and return normally."""
        loop.stopped_by = signal_name or "signal"
        self.observer.event("stop", self.progress.step, signal=loop.stopped_by)
        path = None
        if self.checkpointer is not None and self.cfg.checkpoint.save_on_exit:
            path = self.save_checkpoint()
        where = f"checkpoint {path}" if path else "no checkpoint saved (checkpoint.save_on_exit=false)"
        log.warning("stopped by %s at step %d/%d; %s", loop.stopped_by, self.progress.step,
                    self.total_steps, where)

    def save_checkpoint(self) -> Path:
        if self.checkpointer is None:
            raise TunesmithError("this trainer was built without checkpointing")
        self.guard.flush()  # the checkpoint's skip counters must include this step
        p = self.progress
        meta = {"epoch": p.epoch, "tokens_seen": p.tokens_seen, "skipped_steps": p.skipped_steps}
        if self.observer is not None:
            meta.update(self.observer.checkpoint_meta())  # tracker run ids for a resume
        with self._excluded("checkpoint"):
            path = self.checkpointer.save(p.step, meta=meta)
        if self.observer is not None:
            self.observer.event("checkpoint", p.step, path=str(path))
        return path

    def _excluded(self, kind: str):
        """Time left out of train throughput (eval, checkpoint saves); inert outside train()."""
        tput = getattr(self, "_tput", None)
        return tput.excluded(kind) if tput is not None else nullcontext()

    def _make_observer(self) -> RunObserver:
        par = self.par
        return RunObserver(self.cfg, self.out_dir, self.rt.device, rank=par.rank if par else 0,
                           world_size=par.world_size if par else 1, is_main=self._is_main)

    def _resume_meta(self) -> dict[str, Any] | None:
        """The resume checkpoint's manifest `meta` (tracker run ids live there)."""
        if self.resumed_from is None or self.checkpointer is None:
            return None
        return self.checkpointer.manager.read_manifest(self.resumed_from).get("meta") or {}

    def _step_batches(self) -> Iterator[tuple[list[dict], bool]]:
        """Yield (k micro-batches, epoch_end) per optimizer step until total_steps.

        `progress.epoch` advances as soon as an epoch's last full group is handed out, so a
        checkpoint taken at that step boundary already points at the next epoch. Micro-batches
        left over at the end of an epoch (fewer than k) are never read, so every step has the
        same number of micro-batches.
        """
        k = self.cfg.train.grad_accum_steps
        loader = self.train_loader
        if not hasattr(loader, "__len__"):
            yield from self._stream_batches(k)
            return
        while self.progress.step < self.total_steps:
            loader.set_epoch(self.progress.epoch)  # same epoch: keeps a restored position
            if len(loader) - loader.batches_done < k:
                self.progress.epoch += 1  # nothing left that makes a full step
                continue
            batches = iter(loader)
            while len(loader) - loader.batches_done >= k:
                self._data_epoch = loader.epoch
                group = [next(batches) for _ in range(k)]
                epoch_end = len(loader) - loader.batches_done < k
                if epoch_end:
                    self.progress.epoch += 1
                yield group, epoch_end
                if self.progress.step >= self.total_steps:
                    return

    def _stream_batches(self, k: int) -> Iterator[tuple[list[dict], bool]]:
        """A stream (no length, no epochs): groups of k until max_steps; its position lives in
        the loader's own state_dict, so resume continues the stream exactly."""
        batches = iter(self.train_loader)
        while self.progress.step < self.total_steps:
            group = []
            for _ in range(k):
                try:
                    group.append(next(batches))
                except StopIteration:  # the stream ran dry before max_steps
                    return
            self._data_epoch = 0
            yield group, False

    def train_step(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """One optimizer step over k micro-batches; returns device tensors (no host sync)."""
        # Count targets on the host tensors before they move: the loss is normalised by the
        # total count across all micro-batches *and the ranks holding different tokens* (data-
        # parallel, and context-parallel ones, each counting its own part of the sequence), so
        # k accumulated micro-batches on N ranks give exactly the gradient of one kN-times
        # larger batch.
        n_targets = self._global_count(sum(self.objective.count(self.model, mb) for mb in micro_batches))
        tokens = sum(_count_tokens(mb) for mb in micro_batches)
        samples = sum(mb["input_ids"].size(0) for mb in micro_batches)
        dp = self.par.dp_size if self.par is not None else 1
        # DDP/FSDP average gradients over the dp x cp ranks; dividing by count / (dp x cp)
        # undoes that. Throughput counts assume equal tokens per rank (exact for packed blocks).
        ranks = self.par.token_ranks if self.par is not None else 1
        loss_sum = torch.zeros((), device=self.rt.device)
        for mb in micro_batches:
            loss_sum += self.forward_backward(mb, n_targets / ranks)
        if self.par is not None:
            # The global batch's loss: logged, and what the NaN guard judges on every rank alike.
            self.par.all_reduce_tokens(loss_sum)
        loss = loss_sum / n_targets
        grad_norm = self._clip_and_step(loss)
        self.progress.step += 1
        self.progress.tokens_seen += tokens * dp
        return loss, grad_norm, tokens * dp, samples * dp

    @property
    def _is_main(self) -> bool:
        return self.par is None or self.par.is_main

    @property
    def _distributed(self) -> bool:
        return self.par is not None and self.par.distributed

    def _global_count(self, local: int) -> int | torch.Tensor:
        """Target count summed over the dp x cp ranks, at least 1: an int in one process, else
        a device scalar (one tiny all-reduce per step, never read back by the host)."""
        if self.par is None or self.par.token_ranks == 1:
            return max(local, 1)
        t = torch.tensor(float(local), dtype=torch.float32, device=self.rt.device)
        return self.par.all_reduce_tokens(t).clamp_(min=1.0)

    def forward_backward(self, batch: dict, n_targets: float | torch.Tensor) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns its detached loss *sum*."""
        loss_sum = self.objective.loss_sum(self.model, batch, self.rt)
        scaled = loss_sum / n_targets
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        return loss_sum.detach()

    def _clip_and_step(self, loss: torch.Tensor) -> torch.Tensor:
        """Clip, let the NaN guard decide, step. Returns the (pre-clip) grad norm."""
        in_backward = getattr(self.optimizer, "in_backward", None)
        if in_backward is not None:
            # optim.in_backward: already applied during backward (no clipping: config-checked);
            # the norms it recorded feed the log and the NaN guard (halt only).
            grad_norm, per_param, names = in_backward.grad_norms()
        else:
            grad_norm, per_param, names = self._clip(fold=self.guard.deferred)
        apply = self.guard.check(self.progress.step + 1, loss, grad_norm, per_param, names)
        if apply is None:
            # A fused optimizer (any device, sharded or not): skipped on-device when non-finite,
            # and the clipping is the kernel's `grad_scale` divisor instead of a pass of its own
            # over every gradient.
            max_norm = self.cfg.train.max_grad_norm
            scale = clip_scale(max_norm, grad_norm) if max_norm else None
            self.guard.fused_step(self.optimizer, grad_scale=scale)
        elif apply and self.scaler is not None:
            self.scaler.step(self.optimizer)
        elif apply:
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.after_step()
        return grad_norm.detach()

    def _clip(self, fold: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Unscale (fp16), global grad norm, clip to train.max_grad_norm; (norm, per-param, names).
        fold: measure only; the fused optimizer step applies the clip (`clip_scale`)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        params = [p for _, p in named]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # Sharded (FSDP2/TP DTensor) grads: norms of the full gradients, the same on all ranks.
        if self._distributed:
            settle_partial_grads(params)
        norms = dist_grad_norms if self._distributed else grad_norms
        grad_norm, per_param = norms([p.grad for p in params])
        max_norm = self.cfg.train.max_grad_norm
        if max_norm and not fold:
            clip_grads_with_norm_(params, max_norm, grad_norm)
        return grad_norm, per_param, [n for n, _ in named]

    # ------------------------------------------------------------------ eval
    def evaluate(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        reduce = self.par.all_reduce_tokens if self.par is not None else None
        if self.objective.kind == "preference":
            return evaluate_preferences(self.objective, self.model, self.val_loader, self.rt,
                                        self.cfg.eval.max_batches, reduce)
        return evaluate_loss(self.model, self.val_loader, self.rt, self.cfg.eval.max_batches, reduce)

    def _eval_and_log(self, metrics: MetricsWriter, reporter: ProgressReporter,
                      label: str | None = None) -> dict[str, float]:
        with self._excluded("eval"):
            out = self.evaluate()
        record = {"step": self.progress.step, **out}
        metrics.write(record)
        self.observer.log(record)
        extra = (f"perplexity {out['perplexity']:.2f}" if "perplexity" in out else
                 f"reward accuracy {out['eval_reward_accuracy']:.3f}, margin {out['eval_reward_margin']:.3f}")
        reporter.note(f"{label or f'step {self.progress.step}'}: eval loss {out['eval_loss']:.4f}, {extra}")
        return out

    # ------------------------------------------------------------------ records
    def _log_record(self, loss: float | None, grad_norm: torch.Tensor, tput: Throughput) -> dict[str, Any]:
        tps = tput.tokens_per_s()
        return {
            "step": self.progress.step,
            "epoch": self._data_epoch,
            "loss": loss,
            "lr": float(self.scheduler.get_last_lr()[0]),  # a tensor for torchao optimizers
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tps,  # run average of the timed steps
            "mfu": tput.mfu(tps),
            "tokens_per_s_window": (window := tput.pop_window()),  # steps since the last record
            "mfu_window": tput.mfu(window),
            "peak_mem_gib": peak_memory_gib(self.rt.device),
            "tokens_seen": self.progress.tokens_seen,
            "skipped_steps": self.progress.skipped_steps,
            # task=dpo: mean rewards / accuracy / log-probs of the pairs since the last record
            **self.objective.log_fields(self.par.all_reduce_tokens if self._distributed else None),
        }

    def _summary(self, t_start: float, tput: Throughput, loop: _Loop) -> dict[str, Any]:
        tps = tput.tokens_per_s()
        summary: dict[str, Any] = {
            "runtime_s": time.perf_counter() - t_start,
            "steps": self.progress.step,
            "tokens_seen": self.progress.tokens_seen,
            "train_samples_per_s": tput.samples_per_s(),
            "tokens_per_s": tps,
            "mfu": tput.mfu(tps),
            # Where the wall time went: training steps vs the excluded work (eval_s, checkpoint_s,
            # profile_s); throughput and MFU above count training steps only.
            "train_s": tput.train_s(),
            **{f"{kind}_s": sec for kind, sec in sorted(tput.excluded_s.items())},
            "peak_mem_gib": self.observer.health.run_peak(),
            "train_loss": loop.last_loss,
            "skipped_steps": self.progress.skipped_steps,
            "device": str(self.rt.device),
            "precision": self.rt.precision,
            "interrupted": loop.stopped_by is not None,
        }
        if loop.stopped_by is not None:
            summary["stopped_by"] = loop.stopped_by
        if self.checkpointer is not None and self.checkpointer.last_path is not None:
            summary["checkpoint"] = str(self.checkpointer.last_path)
        if self.resumed_from is not None:
            summary["resumed_from"] = str(self.resumed_from)
        if loop.start_eval:
            summary["eval_loss_start"] = loop.start_eval["eval_loss"]
            if "perplexity" in loop.start_eval:
                summary["perplexity_start"] = loop.start_eval["perplexity"]
        if loop.eval_out:
            summary.update(loop.eval_out)
        summary.update(self.observer.summary_fields(self.flops_per_token, tps))
        return summary


def _count_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    replace_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
