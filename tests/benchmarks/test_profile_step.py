"""benchmarks/profile_step.py's trace breakdown on a hand-built chrome trace (the GPU run itself
is in benchmarks/run_perf_device.sh): categories, optimizer attribution through the launch's
correlation id, idle gaps as the span minus the union of kernel intervals, launch counts."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO


def _load():
    spec = importlib.util.spec_from_file_location("profile_step", REPO / "benchmarks" / "profile_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _k(name, ts, dur, corr, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _launch(ts, corr, name="cudaLaunchKernel", cat="cuda_runtime"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": 2.0, "args": {"correlation": corr}}


def test_breakdown_categories_gaps_and_launches():
    ps = _load()
    events = [
        _launch(0, 1), _k("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 10, 100, 1),
        _launch(1, 2), _k("pytorch_flash::flash_fwd_kernel<...>", 110, 50, 2),
        _launch(2, 3, "cuLaunchKernelEx", "cuda_driver"),
        _k("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", 150, 20, 3),  # overlaps 10 us
        _k("Memcpy HtoD (Pinned -> Device)", 200, 10, 4, cat="gpu_memcpy"),  # 30 us gap before
        _launch(3, 5), _k("void at::native::multi_tensor_apply_kernel<norm>", 210, 5, 5),
        {"ph": "X", "cat": "user_annotation", "name": "Optimizer.step#AdamW.step", "ts": 4, "dur": 2},
        _launch(5, 6), _k("void at::native::multi_tensor_apply_kernel<adam>", 215, 25, 6),
        _k("ncclDevKernel_AllReduce_Sum_f32", 240, 20, 7),
    ]
    b = ps.breakdown({"traceEvents": events}, steps=2)
    ms = b["per_step_ms"]
    per_step = 1e-3 / 2
    assert ms["matmul"] == pytest.approx(100 * per_step)
    assert ms["attention"] == pytest.approx(50 * per_step)
    assert ms["norm+elementwise"] == pytest.approx(20 * per_step)
    assert ms["copies"] == pytest.approx(10 * per_step)
    assert ms["grad clip"] == pytest.approx(5 * per_step)  # foreach outside Optimizer.step
    assert ms["optimizer"] == pytest.approx(25 * per_step)  # launched inside Optimizer.step
    assert ms["communication"] == pytest.approx(20 * per_step)
    # Span 10..260 = 250 us; busy = 10..170 (160) + 200..260 (60) = 220; gap 30.
    assert b["gpu_span_ms"] == pytest.approx(250 * per_step)
    assert ms["idle gaps"] == pytest.approx(30 * per_step)
    assert b["launch_calls_per_step"] == pytest.approx(5 / 2)  # driver launches counted too
    assert b["top_kernels"][0]["category"] == "matmul"
    md = ps.markdown(b, {"date": "d", "gpu": "g", "torch": "t", "shape": "s", "seq": 1, "micro_batch": 1,
                         "sets": "", "warmup": 1, "active": 2, "step_ms": 1.0, "tokens_per_s": 1.0})
    assert "| idle gaps | 0.01 | 12.0% |" in md or "| idle gaps | 0.02 | 12.0% |" in md


def _op(name, ts, dur, tid=1):
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}


def test_kernels_are_charged_to_the_innermost_launching_op():
    ps = _load()
    events = [
        _op("aten::linear", 0, 20), _op("aten::mm", 2, 5),  # mm nested in linear
        {**_launch(3, 1), "tid": 1}, _k("nvjet_sm90_gemm", 30, 40, 1),
        {**_launch(10, 2), "tid": 1}, _k("vectorized_elementwise_kernel<add>", 70, 8, 2),  # linear's own
        _op("aten::mul_", 50, 4, tid=2), {**_launch(51, 3), "tid": 2},
        _k("elementwise_kernel<BinaryFunctor>", 80, 6, 3),
        {**_launch(60, 4), "tid": 1}, _k("triton_poi_fused_x", 90, 2, 4),  # outside any op
    ]
    b = ps.breakdown({"traceEvents": events}, steps=1, top_n=10)
    ops = {(o["op"], o["category"]): o["ms"] for o in b["top_ops"]}
    assert ops == {("aten::mm", "matmul"): pytest.approx(0.040),
                   ("aten::linear", "norm+elementwise"): pytest.approx(0.008),
                   ("aten::mul_", "norm+elementwise"): pytest.approx(0.006),
                   ("(no op)", "norm+elementwise"): pytest.approx(0.002)}
    assert b["top_kernels"][0]["op"] == "aten::mm"


def test_inductor_pointwise_kernels_named_after_a_gemm_are_elementwise():
    ps = _load()
    assert ps.classify("triton_poi_fused__scaled_mm__to_copy_clamp_mul_reciprocal_t_view_4", "kernel", False) \
        == "norm+elementwise"
    assert ps.classify("triton_tem_fused_mm_0", "kernel", False) == "matmul"  # a GEMM template
    assert ps.classify("nvjet_sm90_qqtst_192x192_128x4_2x1_v_bz_coopB_TNN", "kernel", False) == "matmul"
