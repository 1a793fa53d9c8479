"""NaN/inf guard: a non-finite loss or gradient norm never reaches the weights.

Every step computes one device flag, `bad = !isfinite(loss) | !isfinite(grad_norm)`, from
values the step computes anyway (the loss for logging, the grad norm for clipping). What
happens next depends on whether the update can be skipped without the host knowing the flag:

* Deferred (no GradScaler, an optimizer whose fused kernel honours `found_inf`: fused
  AdamW/Adam/SGD, the default AdamW on CUDA, on CPU with optim.fused=true; one process or
  data/FSDP/TP-parallel, where the loss and the global grad norm, hence the flag, are the same
  on every rank, so every rank skips the same steps and halts at the same step).
  We set `optimizer.found_inf = bad.float()` exactly as `GradScaler.step`
  does; the fused kernel then leaves params and moments untouched when it is 1.0, and
  `_fused_adam` subtracts `found_inf` from the `step` counters it just incremented (see
  `torch/optim/adam.py::_fused_adam`), so bias correction is unaffected too. The flag is copied
  to pinned host memory with `non_blocking=True` and read one step late, after the next step's
  kernels are queued, so the check costs no pipeline stall. Under `halt` the skip flag is
  sticky (`bad | any earlier bad`), so the step that runs before the host notices is skipped
  as well and the weights stay exactly those from before the bad step.
* Synchronous (non-fused optimizers, fp16 with GradScaler). The flag is read at once
  (`.item()`): free on CPU, and unavoidable when only the host can decide not to call
  `optimizer.step()`. With a GradScaler, inf/nan gradients are its business (it skips and
  backs off the scale), so only the loss is checked there.

On a bad step: `halt` writes `OUTPUT/nan_diagnostics.json` (step, which quantity, values,
parameters whose gradient norm is non-finite) and raises `NonFiniteError` (exit code 3).
`skip` counts it in `Progress.skipped_steps` and carries on, halting the same way once more
than `max_consecutive_skips` consecutive steps were bad. A skipped step still consumes its
batches and its slot in the LR schedule (the deferred path cannot un-step a scheduler).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tunesmith.errors import NonFiniteError

log = logging.getLogger("tunesmith")

DIAGNOSTICS_FILE = "nan_diagnostics.json"


def grad_norms(grads: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(total L2 norm, per-tensor L2 norms [n]) in fp32 on the grads' device; no host sync.

    The same math as `clip_grad_norm_` (per-tensor norms, then the norm of those), but the
    per-tensor norms are kept: they name the offending parameters if the total is not finite.
    Single-device tensors only (plain or data-parallel replicas).
    """
    if not grads:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, zero.reshape(0)
    norms = torch._foreach_norm(grads)  # one fused kernel per (device, dtype) group
    if len({n.dtype for n in norms}) == 1:
        per = torch.stack(list(norms)).float()
    else:
        per = torch.stack([n.float() for n in norms])
    return torch.linalg.vector_norm(per), per


@dataclass
class StepCheck:
    """One step's guard inputs, kept (on device) until the step's verdict is known."""

    step: int
    bad: Tensor  # bool scalar
    loss: Tensor
    grad_norm: Tensor
    param_norms: Tensor  # [n] fp32, aligned with `names`
    names: list[str]


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # "nan"/"inf": JSON has no literal for them


class NonFiniteGuard:
    """Decides, per step, whether the optimizer update may be applied. See module docstring."""

    def __init__(
        self,
        policy: str,
        max_consecutive: int,
        progress: Any,
        out_dir: Path | None,
        *,
        deferred: bool = False,
        check_grad_norm: bool = True,
    ) -> None:
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.progress = progress  # has skipped_steps / consecutive_skips counters
        self.out_dir = out_dir
        self.deferred = deferred
        self.check_grad_norm = check_grad_norm
        self.last_ok: Tensor | None = None  # this step's "update applied" flag, on device
        self._current: StepCheck | None = None
        self._pending: StepCheck | None = None
        self._halted: Tensor | None = None
        self._host: Tensor | None = None
        self._event: Any = None

    @staticmethod
    def can_defer(optimizer: torch.optim.Optimizer, has_scaler: bool) -> bool:
        """True when the fused kernel can skip the update on-device (see module docstring)."""
        fused = all(g.get("fused") for g in optimizer.param_groups)
        return (not has_scaler and fused
                and getattr(optimizer, "_step_supports_amp_scaling", False))

    # ------------------------------------------------------------------ per step
    def check(self, step: int, loss: Tensor, grad_norm: Tensor, param_norms: Tensor,
              names: list[str]) -> bool | None:
        """Stage this step's check. Sync mode: True = apply the update, False = skip it (or
        raise). Deferred mode: None; pass `skip_flag()` to the fused optimizer instead."""
        finite = torch.isfinite(loss)
        if self.check_grad_norm:
            finite = finite & torch.isfinite(grad_norm)
        self.last_ok = finite
        entry = StepCheck(step, ~finite, loss.detach(), grad_norm.detach(), param_norms, names)
        if self.deferred:
            self._current = entry
            return None
        bad = bool(entry.bad)  # host sync: free on CPU, needed to not call optimizer.step()
        self._verdict(entry, bad)
        return not bad

    def fused_step(self, optimizer: torch.optim.Optimizer, grad_scale: Tensor | None = None) -> None:
        """Run the fused optimizer step with this step's skip flag as `found_inf`; `grad_scale`
        (fp32 scalar on the device) divides every gradient inside the kernel (the clip)."""
        assert self._current is not None, "check() must run before fused_step()"
        skip = self._current.bad
        if self.policy == "halt":
            skip = skip | self._halted if self._halted is not None else skip
            self._halted = skip  # sticky: nothing after a bad step is applied either
            self.last_ok = ~skip
        optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
        if grad_scale is not None:
            optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
            if grad_scale is not None:
                del optimizer.grad_scale  # type: ignore[attr-defined]

    def after_step(self) -> None:
        """Deferred mode: resolve the previous step's flag, then queue this step's copy."""
        if not self.deferred or self._current is None:
            return
        self._resolve_pending()
        entry, self._current = self._current, None
        if entry.bad.device.type == "cuda":
            if self._host is None:
                self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            # One buffer suffices: the previous value was read (above) before this copy is queued.
            self._host.copy_(entry.bad, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        self._pending = entry

    def flush(self) -> None:
        """Resolve any step whose verdict is still on the device (syncs; before saves/logs)."""
        if self.deferred:
            self.after_step()
            self._resolve_pending()

    def _resolve_pending(self) -> None:
        entry, self._pending = self._pending, None
        if entry is None:
            return
        if self._event is not None:
            self._event.synchronize()
            bad = bool(self._host.item())  # type: ignore[union-attr]
            self._event = None
        else:
            bad = bool(entry.bad)
        self._verdict(entry, bad)

    # ------------------------------------------------------------------ verdicts
    def _verdict(self, entry: StepCheck, bad: bool) -> None:
        if not bad:
            self.progress.consecutive_skips = 0
            return
        self.progress.skipped_steps += 1
        self.progress.consecutive_skips += 1
        what = self._quantities(entry)
        values = f"loss={float(entry.loss):.6g}, grad_norm={float(entry.grad_norm):.6g}"
        if self.policy == "halt":
            path = self._write_diagnostics(entry, what)
            raise NonFiniteError(
                f"non-finite {what} at step {entry.step} ({values}); the update was not applied; "
                f"details in {path}; resume from the last checkpoint with a lower optim.lr or "
                "train.nan_policy=skip"
            )
        if self.progress.consecutive_skips > self.max_consecutive:
            path = self._write_diagnostics(entry, what)
            raise NonFiniteError(
                f"{self.progress.consecutive_skips} consecutive non-finite steps up to step "
                f"{entry.step} (last: {what}, {values}), more than "
                f"train.max_consecutive_skips={self.max_consecutive}; details in {path}"
            )
        log.warning("step %d: non-finite %s (%s); update skipped (%d skipped so far)",
                    entry.step, what, values, self.progress.skipped_steps)

    def _quantities(self, entry: StepCheck) -> str:
        parts = []
        if not math.isfinite(float(entry.loss)):
            parts.append("loss")
        if self.check_grad_norm and not math.isfinite(float(entry.grad_norm)):
            parts.append("grad norm")
        return " and ".join(parts) or "loss"

    def _write_diagnostics(self, entry: StepCheck, what: str) -> Path | None:
        norms = entry.param_norms.detach().cpu().tolist()
        bad_params = [n for n, v in zip(entry.names, norms) if not math.isfinite(v)]
        report = {
            "step": entry.step,
            "non_finite": what.replace("grad norm", "grad_norm").split(" and "),
            "loss": _json_float(float(entry.loss)),
            "grad_norm": _json_float(float(entry.grad_norm)),
            "params_with_non_finite_grads": bad_params,
            "policy": self.policy,
            "consecutive_skips": self.progress.consecutive_skips,
            "skipped_steps": self.progress.skipped_steps,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if self.out_dir is None:
            return None
        path = self.out_dir / DIAGNOSTICS_FILE
        try:
            path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            log.warning("could not write %s: %s", path, e.strerror or e)
        return path
