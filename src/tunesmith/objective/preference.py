"""Preference objectives (task=dpo): DPO, IPO and SimPO on the shared forward path.

A micro-batch holds B pairs as 2B padded rows, interleaved (data/preference.py): row 2i is pair
i's chosen answer, row 2i+1 its rejected one, both after the same prompt, with labels -100 on the
prompt and padding. Each row's score is the sum of its target tokens' log-probabilities, read
from the same fused head + cross-entropy kernel the token objective uses (one call per row, so
no [T, V] logits are ever kept).

    row_logps(model, batch, rt)          logp [2B] (fp32) and target counts [2B]
    pair_losses(cfg, logp, ref, counts)  per-pair loss and implicit rewards [B]
    PreferenceObjective                  what the trainer calls: count / loss_sum / log fields

The losses (beta = dpo.beta; log-ratios r = log pi(y|x) - log pi_ref(y|x), summed over tokens):
  sigmoid (DPO):  -(1 - eps) log sig(beta (r_c - r_r)) - eps log sig(-beta (r_c - r_r))
                  (eps = dpo.label_smoothing: conservative DPO; 0 is DPO)
  ipo:            (r_c / n_c - r_r / n_r - 1 / (2 beta))^2, log-ratios averaged per token
                  (as TRL does, so beta means the same across answer lengths)
  simpo:          -log sig(beta (logp_c / n_c - logp_r / n_r) - gamma); no reference
  orpo:           -logp_c / n_c - beta log sig(log odds_c - log odds_r), odds = p / (1 - p) with
                  p = exp(logp / n); no reference (the first term is the chosen answer's
                  per-token NLL: ORPO trains SFT and preference at once)
Rewards (logged): beta r for DPO/IPO, beta logp / n for SimPO and ORPO. The reference is the policy
the run starts from: the base model with its adapters switched off for LoRA/DoRA/QLoRA (no
second copy in memory), else a frozen copy of `model.name` (see `train.setup`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.config.tasks import DPOConfig
from tunesmith.errors import TunesmithError
from tunesmith.objective.forward import head_inputs
from tunesmith.objective.loss import IGNORE_INDEX, linear_cross_entropy
from tunesmith.objective.reference_table import ReferenceTable
from tunesmith.runtime import Runtime
from tunesmith.transforms.float8 import float8_head_recipe


def row_logps(model: nn.Module, batch: dict, rt: Runtime, *, need_grad: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [R] fp32, counts [R] long): per row of the batch, the summed log-probability of its
    target tokens (labels already shifted, -100 ignored) and how many there are."""
    hidden, head, labels = head_inputs(model, _drop_right_padding_mask(batch), rt, need_grad)
    recipe = float8_head_recipe(model.output)
    # One fused call per row: the kernel returns a sum, and each row needs its own gradient
    # scale (d loss / d logp_row), which autograd gives each call separately.
    ce = [linear_cross_entropy(hidden[r], head, labels[r], compute_dtype=rt.compute_dtype,
                               float8=recipe) for r in range(hidden.shape[0])]
    return -torch.stack(ce).float(), (labels != IGNORE_INDEX).sum(dim=1)


def _drop_right_padding_mask(batch: dict) -> dict:
    """The batch without its attention mask when every row is right-padded (real tokens, then
    padding): under causal attention no real token sees a later position, so plain causal
    attention (SDPA's fastest kernels) gives every real token exactly what the padding mask
    would; the padded positions' outputs carry no target and are never scored."""
    mask = batch.get("attention_mask")  # [R, T] host tensor: checking it costs no device sync
    if mask is None or "doc_ids" in batch or not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return batch
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def pair_losses(cfg: DPOConfig, logp: torch.Tensor, ref_logp: torch.Tensor | None,
                counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses [B], chosen rewards [B], rejected rewards [B]) from interleaved rows [2B]; rewards
    are detached (they are only logged)."""
    n = counts.clamp(min=1).to(logp.dtype)
    pc, pr, nc, nr = logp[0::2], logp[1::2], n[0::2], n[1::2]
    if cfg.loss in ("simpo", "orpo"):
        ac, ar = pc / nc, pr / nr  # average log-prob per target token (< 0)
        if cfg.loss == "simpo":
            losses = -F.logsigmoid(cfg.beta * (ac - ar) - cfg.simpo_gamma)
        else:  # log odds p / (1 - p) with p = exp(avg logp); log(1 - e^a) = log(-expm1(a))
            log_odds = (ac - ar) - (_log1m_exp(ac) - _log1m_exp(ar))
            losses = -ac - cfg.beta * F.logsigmoid(log_odds)
        return losses, (cfg.beta * ac).detach(), (cfg.beta * ar).detach()
    if ref_logp is None:
        raise ValueError(f"dpo.loss={cfg.loss} needs the reference log-probs")
    rc, rr = pc - ref_logp[0::2], pr - ref_logp[1::2]  # log-ratios [B]
    if cfg.loss == "ipo":
        losses = (rc / nc - rr / nr - 1.0 / (2.0 * cfg.beta)) ** 2
    else:
        z = cfg.beta * (rc - rr)
        eps = cfg.label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return losses, (cfg.beta * rc).detach(), (cfg.beta * rr).detach()


def _log1m_exp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - e^a) for a < 0, accurate near 0 (a row whose every target is certain gives a ~ 0)."""
    return torch.log(-torch.expm1(a.clamp(max=-1e-7)))


# The logged means, in this order, from the accumulated sums (one host read per log record).
_FIELDS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy",
           "logps_chosen", "logps_rejected")


class PreferenceObjective:
    """The trainer's objective for task=dpo: the count it normalises by is the number of pairs,
    and the loss sum is the sum of pair losses, so k micro-batches on N ranks give the
    gradient of the mean pair loss over the whole step.

    `reference`: a frozen model (full fine-tunes), or None with `adapters_off` (a context
    manager factory over the policy: LoRA / DoRA / QLoRA), or neither for SimPO.
    """

    kind = "preference"

    def __init__(self, cfg: DPOConfig, *, reference: nn.Module | None = None,
                 adapters_off: Callable[[], AbstractContextManager] | None = None) -> None:
        if cfg.uses_reference and reference is None and adapters_off is None:
            raise ValueError(f"dpo.loss={cfg.loss} needs a reference model or adapters to switch off")
        self.cfg, self.reference, self.adapters_off = cfg, reference, adapters_off
        self.table: ReferenceTable | None = None  # dpo.precompute_reference: see `use_table`
        self._sums: torch.Tensor | None = None  # [len(_FIELDS)] device sums since the last read
        self._pairs = 0

    def use_table(self, table: ReferenceTable) -> bool:
        """From now on the reference log-probs come from `table` (precomputed); the frozen
        reference copy, if there was one, is dropped. Returns whether one was."""
        released = self.reference is not None
        self.table, self.reference, self.adapters_off = table, None, None
        if released:  # a module graph holds reference cycles: collect now, not at some later gc
            gc.collect()
        return released

    def count(self, model: nn.Module, batch: dict) -> int:
        """Pairs in the (host) batch."""
        return batch["input_ids"].shape[0] // 2

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, batch: dict, rt: Runtime) -> torch.Tensor | None:
        """The reference policy's row log-probs [2B] (None for SimPO)."""
        if not self.cfg.uses_reference:
            return None
        if self.table is not None:
            return self.table.lookup(batch, rt.device)
        if self.reference is not None:
            return row_logps(self.reference, batch, rt, need_grad=False)[0]
        with self.adapters_off() if self.adapters_off is not None else nullcontext():
            return row_logps(model, batch, rt, need_grad=False)[0]

    def pair_terms(self, model: nn.Module, batch: dict, rt: Runtime, *, need_grad: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(losses, chosen rewards, rejected rewards, logp) for the batch's pairs."""
        ref = self.reference_logps(model, batch, rt)
        logp, counts = row_logps(model, batch, rt, need_grad=need_grad)
        losses, chosen, rejected = pair_losses(self.cfg, logp, ref, counts)
        return losses, chosen, rejected, logp.detach()

    def loss_sum(self, model: nn.Module, batch: dict, rt: Runtime) -> torch.Tensor:
        """Sum of the batch's pair losses (the graph is kept for backward); the logged reward
        statistics accumulate on the device."""
        losses, chosen, rejected, logp = self.pair_terms(model, batch, rt)
        self._accumulate(_stat_sums(chosen, rejected, logp))
        self._pairs += chosen.numel()
        return losses.sum()

    def _accumulate(self, sums: torch.Tensor) -> None:
        self._sums = sums if self._sums is None else self._sums + sums

    def log_fields(self, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> dict[str, float]:
        """Mean reward statistics over the pairs since the last call (global when `all_reduce`
        sums over the data-parallel ranks); resets. One host read."""
        if self._sums is None:
            return {}
        sums = torch.cat([self._sums, torch.tensor([float(self._pairs)], device=self._sums.device)])
        if all_reduce is not None:
            sums = all_reduce(sums)
        values = sums.tolist()
        self._sums, self._pairs = None, 0
        return {name: v / max(values[-1], 1.0) for name, v in zip(_FIELDS, values[:-1])}


def _stat_sums(chosen: torch.Tensor, rejected: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Sums over the pairs of the `_FIELDS` statistics: [len(_FIELDS)] fp32."""
    return torch.stack([chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                        (chosen > rejected).float().sum(), logp[0::2].sum(), logp[1::2].sum()]).float()


@torch.no_grad()
def evaluate_preferences(objective: PreferenceObjective, model: nn.Module, loader, rt: Runtime,
                         max_batches: int | None = None,
                         all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Mean pair loss and reward statistics over `loader` (global with `all_reduce`)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(len(_FIELDS) + 2, device=rt.device)  # loss, stats..., pairs
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        losses, chosen, rejected, logp = objective.pair_terms(model, batch, rt, need_grad=False)
        total += torch.cat([losses.sum()[None].float(), _stat_sums(chosen, rejected, logp),
                            torch.tensor([float(chosen.numel())], device=rt.device)])
    model.train(was_training)
    if all_reduce is not None:
        total = all_reduce(total)
    values = total.tolist()
    pairs = values[-1]
    if pairs <= 0:
        raise TunesmithError("evaluation saw no preference pairs; check the validation data")
    out = {"eval_loss": values[0] / pairs, "eval_pairs": int(pairs)}
    out.update({f"eval_{name}": v / pairs for name, v in zip(_FIELDS, values[1:-1])})
    return out


__all__ = ["PreferenceObjective", "evaluate_preferences", "pair_losses", "row_logps"]
