"""Resume decisions: which checkpoint, whether it belongs to this run, and fixing up records.

A checkpoint may only continue a run that would have produced it: the keys in `STRICT_KEYS`
(model, data, batch geometry, seed, optimizer kind) decide what the next batches and updates
are, so any difference is an error naming each key with both values. Everything else is allowed
and takes effect from the resume step: logging, eval, checkpointing, output options,
`train.max_steps`/`epochs` (extending a run; note that a decaying LR schedule is computed from
the new total), `data.num_proc`/`cache_dir`, and optimizer hyperparameters such as `optim.lr`
(re-applied over the checkpoint's values by `apply_optimizer_config`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.checkpoint import CheckpointManager
from tunesmith.checkpoint.metadata import saved_tensors
from tunesmith.config import RunConfig
from tunesmith.config.loader import read_yaml
from tunesmith.config.schema import ParallelConfig
from tunesmith.errors import TunesmithError
from tunesmith.hf.files import replace_text
from tunesmith.parallel.layout import env_world, resolve_layout

log = logging.getLogger("tunesmith")

# Dotted config keys (and everything below them) that a resumed run must not change.
STRICT_KEYS = (
    "task", "model.name", "model.overrides", "model.tokenizer", "data",
    "train.micro_batch_size", "train.grad_accum_steps", "train.seed", "optim.name",
    # sft.* renders the SFT / DPO records (format, template, fields, packing): another value
    # gives other rows, and the loader's resume position would point into them; dpo.loss is
    # the objective itself (dpo.beta, like optim.lr, may change).
    "sft", "dpo.loss",
)
# Exceptions under a strict prefix: they change how, not what, is computed.
LENIENT_KEYS = ("data.num_proc", "data.cache_dir")


@dataclass
class ResumePlan:
    checkpoint: Path | None  # None: start from scratch
    step: int = 0


def _flatten(d: Mapping[str, Any]) -> dict[str, Any]:
    """`section.key -> value`; values below that (model.overrides) are compared whole."""
    out: dict[str, Any] = {}
    for section, body in d.items():
        if isinstance(body, Mapping):
            out.update({f"{section}.{k}": v for k, v in body.items()})
        else:
            out[section] = body
    return out


def _is_strict(key: str) -> bool:
    def under(prefixes: tuple[str, ...]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    return under(STRICT_KEYS) and not under(LENIENT_KEYS)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every strict key that differs.

    Keys present on one side only (configs written by another tunesmith version) are skipped.
    """
    a, b = _flatten(saved), _flatten(current)
    return [(k, a[k], b[k]) for k in sorted(set(a) & set(b)) if _is_strict(k) and a[k] != b[k]]


def reshard_differences(diffs: list[tuple[str, Any, Any]], saved: Mapping[str, Any], cfg: RunConfig,
                        manifest: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Allow a different world size / micro-batch when the global batch stays the same.

    A checkpoint saved on 4 ranks x micro-batch 2 resumes on 2 ranks x 4 (or 1 x 8): the
    data-parallel degree comes from each run's `parallel` section and world size.
    """
    rest = [d for d in diffs if d[0] != "train.micro_batch_size"]
    try:
        old_pc = ParallelConfig.model_validate(saved.get("parallel") or {})
        old_dp = resolve_layout(old_pc, int(manifest.get("world_size", 1))).dp
        world, local = env_world()
        new_dp = resolve_layout(cfg.parallel, world, local).dp
    except (TunesmithError, ValueError):
        return diffs  # an unreadable layout: compare micro-batches as given
    old_mb = int((saved.get("train") or {}).get("micro_batch_size", cfg.train.micro_batch_size))
    if old_dp == new_dp:
        return diffs  # same rank count: the micro-batch itself must match
    if old_mb * old_dp != cfg.train.micro_batch_size * new_dp:
        key = "global batch (train.micro_batch_size x data-parallel ranks)"
        return [*rest, (key, f"{old_mb} x {old_dp}", f"{cfg.train.micro_batch_size} x {new_dp}")]
    return rest


def describe_differences(diffs: list[tuple[str, Any, Any]], what: str) -> str:
    shown = "; ".join(f"{k} ({what}: {old!r}, now: {new!r})" for k, old, new in diffs[:4])
    more = f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
    return shown + more


# ----------------------------------------------------------------------------- planning
def _resolve(mgr: CheckpointManager, resume: str) -> Path | None:
    """Like `CheckpointManager.resolve`, plus: a run output dir means its newest checkpoint."""
    p = Path(resume).expanduser()
    if resume.strip().lower() != "auto" and not resume.strip().isdigit() and p.is_dir() \
            and not (p / "manifest.json").exists() and (p / "checkpoints").is_dir():
        found = CheckpointManager(p, verify=mgr.verify_mode).latest_complete()
        if found is None:
            raise TunesmithError(f"resume directory {p} holds no valid checkpoint under {p / 'checkpoints'}")
        return found
    return mgr.resolve(resume)


def plan_resume(cfg: RunConfig, mgr: CheckpointManager) -> ResumePlan:
    """Pick the checkpoint to resume from (None = fresh) and check it matches `cfg`."""
    resume = cfg.checkpoint.resume
    if resume is None:
        return ResumePlan(None)
    mgr.cleanup_partial()
    ckpt = _resolve(mgr, resume)
    if ckpt is None:
        log.info("checkpoint.resume=auto: no checkpoint under %s, starting from scratch", mgr.dir)
        return ResumePlan(None)
    saved = mgr.read_config(ckpt)
    if not saved:
        log.warning("checkpoint %s has no config.yaml: cannot check it matches this run", ckpt)
    diffs = config_differences(saved, cfg.model_dump(mode="json")) if saved else []
    if saved:
        diffs = reshard_differences(diffs, saved, cfg, mgr.read_manifest(ckpt))
    if diffs:
        raise TunesmithError(
            f"cannot resume from {ckpt}: the run config differs in "
            f"{describe_differences(diffs, 'checkpoint')}; restore these or start a new run"
        )
    step = int(mgr.read_manifest(ckpt).get("step", mgr.step_of(ckpt) or 0))
    if cfg.train.max_steps is not None and cfg.train.max_steps < step:
        raise TunesmithError(
            f"train.max_steps={cfg.train.max_steps} is before checkpoint {ckpt} (step {step}); "
            f"set train.max_steps >= {step} to continue from it"
        )
    log.info("resuming from %s (step %d)", ckpt, step)
    return ResumePlan(ckpt, step)


class RunFinished(Exception):
    """Resuming a run that already completed: nothing to train, nothing to write."""

    def __init__(self, out_dir: Path, checkpoint: Path, step: int) -> None:
        super().__init__(f"the run in {out_dir} already finished at step {step} (checkpoint "
                         f"{checkpoint}); nothing to do, its files are left as they were")
        self.summary_path = out_dir / "summary.json"


def check_not_finished(out_dir: Path, plan: ResumePlan, total_steps: int | None) -> None:
    """Raise `RunFinished` when `plan` resumes at the run's last step and the run completed.

    summary.json is the last file a run writes, so its presence means the final eval and the
    final model are there too; without it (a crash after the last checkpoint) the resume goes
    on and finishes the run.
    """
    if plan.checkpoint is None or total_steps is None or plan.step != total_steps:
        return
    if (out_dir / "summary.json").is_file():
        raise RunFinished(out_dir, plan.checkpoint, plan.step)


def check_run_dir_matches(out_dir: Path, cfg: RunConfig) -> None:
    """With resume set, `out_dir` may hold a run, but only this one (same strict keys)."""
    f = out_dir / "config.yaml"
    if not f.is_file() or cfg.output.overwrite:
        return
    diffs = config_differences(read_yaml(f), cfg.model_dump(mode="json"))
    if diffs:
        raise TunesmithError(
            f"output directory {out_dir} holds a different run: "
            f"{describe_differences(diffs, 'there')}; choose another output.dir or set "
            "output.overwrite=true"
        )


def check_model_matches(ckpt: Path, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Fail clearly when the checkpoint's model tensors do not fit `model` (names, shapes)."""
    saved = saved_tensors(ckpt, "model.", allow_pickle=True)  # resume trusts the checkpoint
    mine = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(mine) - set(saved))
    extra = sorted(set(saved) - set(mine))
    shapes = [f"{k} {list(saved[k][0])} in the checkpoint vs {list(mine[k])} here"
              for k in sorted(set(mine) & set(saved)) if saved[k][0] != mine[k]]
    problem = (f"shape mismatch: {shapes[0]}" + (f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else "")
               if shapes else f"it lacks {missing[0]}" if missing
               else f"it has unexpected tensor {extra[0]}" if extra else None)
    if problem:
        raise TunesmithError(f"checkpoint {ckpt} was saved from a different model: {problem}")


# ----------------------------------------------------------------------------- after loading
def apply_optimizer_config(optimizer: torch.optim.Optimizer, scheduler: Any,
                           live_groups: list[dict[str, Any]]) -> None:
    """Re-apply this run's optimizer hyperparameters over the ones loaded from a checkpoint.

    Loading an optimizer state replaces whole param groups, so a changed `optim.lr`,
    `weight_decay`, `betas` or `eps` (or fused/foreach for another device) would silently be
    ignored. `live_groups` are the groups as built from the current config, snapshot before
    loading. Unchanged values are left bit-for-bit as loaded.
    """
    for i, (group, live) in enumerate(zip(optimizer.param_groups, live_groups)):
        for key, value in live.items():
            if key not in ("params", "lr", "initial_lr") and group.get(key) != value:
                group[key] = value
        new_base = live.get("initial_lr")
        if new_base is not None and group.get("initial_lr") != new_base:
            log.info("optim.lr changed to %g on resume", new_base)
            group["initial_lr"] = new_base
            scheduler.base_lrs[i] = new_base
            lr = new_base * scheduler.lr_lambdas[i](scheduler.last_epoch)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(float(lr))  # torchao's optimizers keep lr as a tensor
            else:
                group["lr"] = lr
            scheduler._last_lr[i] = group["lr"]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step` (those of a resumed run are re-logged); drop torn lines."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a killed process may be half-written
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            kept.append(line)
    replace_text(path, "".join(k + "\n" for k in kept))
