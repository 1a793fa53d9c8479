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
    assert summary["profiled_steps"] == 4


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


def _tiny_recipe(tok, train, out, **sections) -> dict:
    recipe = {
        "model": {"name": "tiny", "tokenizer": str(tok), "overrides": {
            "vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
            "intermediate_size": 128, "max_position_embeddings": 512}},
        "data": {"path": str(train), "block_size": 64},
        "train": {"micro_batch_size": 8, "precision": "fp32", "max_steps": 5},
        "eval": {"at_end": False}, "logging": {"progress": False, "steps": 1, "report": False},
        "output": {"dir": str(out)},
    }
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    return recipe


def test_flop_counted_step_leaves_the_compiled_blocks_compiled(tmp_path, tiny_tokenizer_dir, demo_text):
    """FlopCounterMode is a TorchDispatchMode: a compiled block entered under it used to be
    marked 'skip' by dynamo for good, so every later step ran eagerly (30% slower on a 1B
    model). The counted step now runs with dynamo out of the way: no dispatch mode is left on
    the stack, nothing recompiles, and the next steps run the same compiled graphs."""
    import torch
    import torch._dynamo.utils as dynamo_utils

    import tunesmith

    calls = {"n": 0}

    def counting_backend(gm, example_inputs):  # the compiled graph, run as traced
        def run(*args):
            calls["n"] += 1
            return gm.forward(*args)
        return run

    trainer = tunesmith.Trainer.from_config(_tiny_recipe(
        tiny_tokenizer_dir, demo_text[0], tmp_path / "run",
        profile={"count_flops": True, "flop_counter_start": 2}))
    for block in trainer.model.layers:  # what train.compile does, with a backend we can watch
        block.compile(backend=counting_backend)
    per_step, frames, modes = [], [], []

    def watch(tr, loss, grad_norm):
        per_step.append(calls["n"] - sum(per_step))
        frames.append(dynamo_utils.counters["frames"]["total"])
        modes.append(torch._C._len_torch_dispatch_stack())

    trainer.hooks.append(watch)
    try:
        summary = trainer.train()
    finally:
        torch._dynamo.reset()
    assert per_step[2] == 0  # step 3, counted: eager
    assert per_step[0] == per_step[1] == per_step[3] == per_step[4] > 0, per_step
    assert frames[1] == frames[4], frames  # no frame compiled after step 2
    assert modes == [0] * 5
    assert summary["measured_tflops_per_step"] > 0 and summary["profiled_steps"] == 1


class _History:
    """The CUDA allocator's history recording, observed: what a CPU run cannot do for real."""

    def __init__(self):
        self.on = False
        self.log: list[str] = []

    def start(self):
        self.on = True
        self.log.append("start")

    def stop(self):
        self.on = False
        self.log.append("stop")

    def dump(self, path):
        assert self.on, "dumped after recording stopped"
        path.write_bytes(b"snapshot")
        self.log.append("dump")

    def peak_bytes(self):
        return 2**30


def test_memory_history_recording_stops_once_the_snapshot_is_written(tmp_path):
    import torch

    from tunesmith.config.schema import ProfileConfig
    from tunesmith.observe.profiler import StepProfiler

    history = _History()
    prof = StepProfiler(ProfileConfig(memory_snapshot=True, top_kernels=3), tmp_path, 0,
                        torch.device("cpu"), history=history)
    recording = []
    for step in range(1, 7):
        prof.before(step)
        recording.append(history.on)
        prof.after(step)
    assert recording == [True, True, True, False, False, False]  # the first 3 steps only
    assert history.log == ["start", "dump", "stop"] and not prof.recording
    assert prof.outputs["memory_snapshot_steps"] == "1-3"
    assert (tmp_path / "profile" / "memory_snapshot_rank0.pickle").read_bytes() == b"snapshot"

    # A run that stops inside the recorded steps still writes what it recorded, then stops.
    history = _History()
    prof = StepProfiler(ProfileConfig(memory_snapshot=True, steps=(2, 4), dir=str(tmp_path / "p")),
                        tmp_path, 1, torch.device("cpu"), history=history)
    for step in (1, 2, 3):
        prof.before(step)
        prof.after(step)
    assert history.on and prof.watches(3) and not prof.watches(5)
    prof.close()
    assert history.log == ["start", "dump", "stop"]
    assert prof.outputs["memory_snapshot_steps"] == "2-3"
    assert (tmp_path / "p" / "memory_snapshot_rank1.pickle").is_file()


def test_top_kernels_leave_out_markers_and_shorten_names():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from tunesmith.observe.profiler import ranked_ops, short_name

    def ev(name, us, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(key=name, device_type=device, device_time_total=us,
                               is_user_annotation=annotation)

    gemm = "nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NNT"
    fill = ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
            "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)")
    events = [ev(gemm, 300.0), ev(gemm, 200.0), ev(fill, 100.0),
              ev("Command Buffer Full", 900.0), ev("CUPTI Buffer Flush", 50.0),
              ev("ProfilerStep#30", 2000.0, annotation=True), ev("Stream Sync", 70.0),
              ev("cudaLaunchKernel", 400.0, device=DeviceType.CPU), ev("aten::mm", 10.0, DeviceType.CPU)]
    assert ranked_ops(events, cuda=True) == [(gemm, 500.0, 2), (fill, 100.0, 1)]

    assert short_name(fill) == "at::native::vectorized_elementwise_kernel"
    assert short_name("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, "
                      "float, float, Epilogue>(float*, float const*, int)") == "at::native::cunn_SoftMaxForward"
    assert short_name("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_"
                      "32x6_tn_align8>(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_"
                      "align8::Params)") == ("cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_"
                                             "relu_bf16_64x64_32x6_tn_align8>")[:57] + "..."
    assert short_name("Memcpy DtoD (Device -> Device)") == "Memcpy DtoD"
    assert short_name(gemm) == gemm and short_name("aten::mm") == "aten::mm"
    long = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_kernel"
    assert short_name(long) == long[:57] + "..." and len(short_name(long)) == 60
