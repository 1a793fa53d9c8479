"""Measured FLOPs of one training step (`profile.count_flops`), next to the MFU formula's.

`torch.utils.flop_counter.FlopCounterMode` counts the matmul/attention FLOPs of every op the
step dispatches (forward, backward, recomputation included) on this rank. The formula behind
MFU (`tunesmith.train.metrics`) counts 6*N + attention per token and leaves recomputation out,
so the ratio measured/formula shows what activation checkpointing or an un-modelled op costs;
MFU itself keeps the documented formula.
"""

from __future__ import annotations

from typing import Any

from torch.utils.flop_counter import FlopCounterMode


class StepFlops:
    """Counts the step after `start` warm-up steps (compile and allocator warm-up done)."""

    def __init__(self, start: int, world_size: int):
        self.start = start
        self.world = world_size
        self.seen = 0  # steps run in this process
        self.measured: float | None = None  # FLOPs of the counted step, all ranks
        self.tokens: int | None = None  # tokens of the counted step, all ranks

    def due(self) -> bool:
        return self.measured is None and self.seen == self.start

    def counter(self) -> FlopCounterMode:
        return FlopCounterMode(display=False)

    def record(self, mode: FlopCounterMode, tokens: int) -> None:
        # Every rank runs the same per-rank work (equal batches; sharded weights are gathered
        # for compute), so the job's FLOPs are this rank's times the world size.
        self.measured = float(mode.get_total_flops()) * self.world
        self.tokens = tokens

    def summary(self, flops_per_token: float, tokens_per_s: float | None) -> dict[str, Any]:
        if self.measured is None or not self.tokens:
            return {}
        formula = flops_per_token * self.tokens
        out: dict[str, Any] = {
            "measured_tflops_per_step": self.measured / 1e12,
            "formula_tflops_per_step": formula / 1e12,
            "measured_vs_formula": self.measured / formula if formula else None,
        }
        if tokens_per_s:
            # Steps per second of the timed (uninstrumented) steps times the counted FLOPs.
            out["achieved_tflops_per_s"] = self.measured / self.tokens * tokens_per_s / 1e12
        return out
