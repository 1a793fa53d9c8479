"""Measured FLOPs of one training step (`profile.count_flops`), next to the MFU formula's.

`torch.utils.flop_counter.FlopCounterMode` counts the matmul/attention FLOPs of every op the
step dispatches (forward, backward, recomputation included) on this rank. The formula behind
MFU (`tunesmith.train.metrics`) counts 6*N + attention per token and leaves recomputation out,
so the ratio measured/formula shows what activation checkpointing or an un-modelled op costs;
MFU itself keeps the documented formula.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _as_query_heads(query_shape, kv_shape) -> tuple[int, ...]:
    # Grouped-query attention on CUDA reaches the fused kernels with K/V at [B, H_kv, S, D]
    # (enable_gqa) while Q is [B, H_q, S, D]; torch's formula asserts equal heads. Each query
    # head still does the full S_q x S_k work against its shared K/V head, so count K/V as if
    # repeated to H_q heads.
    b, hq = query_shape[0], query_shape[1]
    return (b, hq, *kv_shape[2:])


def _gqa_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, _as_query_heads(query_shape, key_shape),
                           _as_query_heads(query_shape, value_shape))


def _gqa_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args,
                       out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape,
                                    _as_query_heads(query_shape, key_shape),
                                    _as_query_heads(query_shape, value_shape))


# The CUDA kernels, and the CPU flash kernel that torch's own table leaves out (so that CPU
# runs would count no attention at all).
_FUSED_SDPA = ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
_GQA_FORMULAS = {
    **{getattr(aten, name): _gqa_sdpa for name in _FUSED_SDPA if hasattr(aten, name)},
    **{getattr(aten, f"{name}_backward"): _gqa_sdpa_backward for name in _FUSED_SDPA
       if hasattr(aten, f"{name}_backward")},
}


class StepFlops:
    """Counts one step after `start` warm-up steps (compile and allocator warm-up done)."""

    def __init__(self, start: int, world_size: int):
        self.start = start
        self.world = world_size
        self.seen = 0  # steps run in this process
        self.measured: float | None = None  # FLOPs of the counted step, all ranks
        self.tokens: int | None = None  # tokens of the counted step, all ranks

    def due(self) -> bool:
        """The first step after `start` steps in this process not yet counted (the observer
        skips steps under the profiler, so a trace never shows the eager counted step)."""
        return self.measured is None and self.seen >= self.start

    def counter(self) -> FlopCounterMode:
        return FlopCounterMode(display=False, custom_mapping=_GQA_FORMULAS)

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
