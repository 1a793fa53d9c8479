"""Profiler trace, top-kernels line and FLOP counter on a real (CPU) run, files read back."""

from __future__ import annotations

import json

from tests.observe.helpers import records, tiny_run_args
from tunesmith.cli.main import run


def test_profile_trace_top_kernels_and_flop_count(tmp_path, tiny_tokenizer_dir, demo_text, capsys):
    train, valid = demo_text
    out = tmp_path / "run"
    args = tiny_run_args(tiny_tokenizer_dir, out, train, valid, **{
        "train.max_steps": 6, "eval.at_end": "false", "profile.steps": "[3,4]",
        "profile.record_shapes": "true", "profile.count_flops": "true", "profile.flop_counter_start": 4})
    assert run(args) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())

    trace = json.loads((out / "profile" / "trace_rank0_steps3-4.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    # Two traced steps (the profiler numbers steps from its own start, warm-up step unrecorded).
    assert len({n for n in names if n and n.startswith("ProfilerStep#")}) == 2
    assert any("Input Dims" in e.get("args", {}) for e in trace["traceEvents"])  # record_shapes
    top = (out / "profile" / "top_kernels_rank0.txt").read_text().splitlines()
    assert top[0].startswith("top kernels by CPU time: aten::") and "%" in top[0]
    assert summary["top_kernels"] == top[0]
    assert summary["profile_s"] > 0  # profiled steps and the export are timed apart

    # One step's FLOPs counted, next to the 6N + attention formula behind MFU.
    assert summary["measured_tflops_per_step"] > 0
    assert 0.7 < summary["measured_vs_formula"] < 1.3, summary
    tokens_per_step = 8 * 64
    assert summary["formula_tflops_per_step"] * 1e12 == tokens_per_step * _flops_per_token(out)
    steps_per_s = summary["tokens_per_s"] / tokens_per_step
    assert abs(summary["achieved_tflops_per_s"] - summary["measured_tflops_per_step"] * steps_per_s) < 1e-12
    # Steps 2-5 were instrumented (2: profiler warm-up, 3-4 traced, 5 FLOP-counted): left out.
    recs = [r for r in records(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens_per_s_window"] is None for r in recs] == [False, True, True, True, True, False]


def _flops_per_token(out):
    from tunesmith.config.loader import read_yaml
    from tunesmith.models import build_model, resolve_model_config

    cfg = read_yaml(out / "config.yaml")
    family, mcfg = resolve_model_config(cfg["model"]["name"], cfg["model"]["overrides"])
    return float(build_model(family, mcfg, device="meta").flops_per_token(64))


def test_profile_window_spellings():
    from tunesmith.config.schema import ProfileConfig

    assert ProfileConfig(steps=(3, 5)).window == (3, 5)
    assert ProfileConfig(wait=1, warmup=1, active=3).window == (3, 5)  # llama-recipes
    assert ProfileConfig().window is None


def test_flop_counter_counts_grouped_query_attention_as_repeated_heads():
    """GQA reaches the fused SDPA kernels with K/V at fewer heads (torch's own formula asserts
    on that, which crashed `profile.count_flops` for Llama 3 shapes on CUDA); each query head
    still does the full attention work, and the CPU kernel is counted too."""
    import torch
    import torch.nn.functional as F

    from tunesmith.observe.flops import StepFlops, _gqa_sdpa, _gqa_sdpa_backward
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    q, kv = (2, 8, 16, 4), (2, 2, 16, 4)
    assert _gqa_sdpa(q, kv, kv) == sdpa_flop_count(q, q, q) > 0
    assert _gqa_sdpa_backward(q, q, kv, kv) == sdpa_backward_flop_count(q, q, q, q) > 0
    counted = []
    for k_shape in (q, kv):
        mode = StepFlops(start=0, world_size=1).counter()
        with mode:
            query = torch.randn(q, requires_grad=True)
            out = F.scaled_dot_product_attention(query, torch.randn(k_shape), torch.randn(k_shape),
                                                 is_causal=True, enable_gqa=True)
            out.sum().backward()
        counted.append(mode.get_total_flops())
    assert counted[0] == counted[1] == sdpa_flop_count(q, q, q) + sdpa_backward_flop_count(q, q, q, q)
