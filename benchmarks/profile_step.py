"""Where a training step's GPU time goes, by category (issue #14 item 3).

    PYTHONPATH=src python3 benchmarks/profile_step.py --out OUT [--set optim.in_backward=true]

Builds the 1B shape as `tunesmith train` does (bench_clm.build_trainer: compiled blocks, bf16
autocast, fused AdamW), runs --warmup steps (compile, allocator), then traces --active steps
with torch.profiler (CPU + CUDA) and splits the traced GPU time into:

    matmul          GEMM kernels (cuBLAS / CUTLASS / nvjet / float8 scaled_mm)
    attention       SDPA kernels (flash / cuDNN / memory-efficient), forward and backward
    norm+elementwise  everything else launched by the model and the loss (inductor's fused
                    triton kernels: RMSNorm, RoPE, SwiGLU, residual adds, casts, the CE softmax)
    optimizer       kernels launched inside Optimizer.step (or with adam in the name)
    grad clip       multi-tensor (foreach) kernels outside the optimizer: the global grad norm
    communication   NCCL kernels
    copies          memcpy / memset
    idle gaps       time inside the traced window when no kernel runs

and on the CPU side the launch calls (cudaLaunchKernel and friends: count and total time), and
the step's wall time. Writes OUT/profile.json, OUT/profile.md and the chrome trace.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CATEGORIES = ("matmul", "attention", "norm+elementwise", "optimizer", "grad clip",
              "communication", "copies")
_ATTENTION = ("flash", "fmha", "attention", "sdpa", "attn")
_MATMUL = ("triton_tem", "gemm", "cutlass", "xmma", "nvjet", "cublas", "scaled_mm", "splitk", "matmul", "wgmma")
_RUNTIME = ("cuda_runtime", "cuda_driver")  # triton launches through the driver API
_LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
           "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")


def classify(name: str, cat: str, in_optimizer: bool) -> str:
    """The category of one GPU event (`cat`: the trace's event category)."""
    n = name.lower()
    if cat in ("gpu_memcpy", "gpu_memset") or n.startswith(("memcpy", "memset")):
        return "copies"
    if "nccl" in n:
        return "communication"
    if in_optimizer or "adam" in n:
        return "optimizer"
    if any(k in n for k in _ATTENTION):
        return "attention"
    if n.startswith(("triton_poi", "triton_red", "triton_per")):
        return "norm+elementwise"  # inductor's fused pointwise/reduction kernels, whose names
        # list the ops fused in (a float8 cast feeding a GEMM reads "..._scaled_mm_...")
    if any(k in n for k in _MATMUL):
        return "matmul"
    if "multi_tensor_apply" in n or "foreach" in n:
        return "grad clip"
    return "norm+elementwise"


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _launching_ops(events: list[dict]) -> dict:
    """correlation id -> name of the innermost CPU op around the launch that carries it.

    One sweep per thread over ops and launches sorted by start time, with a stack of the ops
    still open: the innermost open op at a launch is the stack's top."""
    by_tid: dict = {}
    for e in events:
        if e.get("cat") == "cpu_op":
            by_tid.setdefault(e.get("tid"), []).append((e["ts"], 0, -e["dur"], e["name"]))
        elif e.get("cat") in _RUNTIME and "correlation" in e.get("args", {}):
            by_tid.setdefault(e.get("tid"), []).append((e["ts"], 1, 0, e["args"]["correlation"]))
    out = {}
    for items in by_tid.values():
        stack: list[tuple[float, str]] = []  # (end, name)
        for ts, kind, neg_dur, val in sorted(items, key=lambda x: (x[0], x[1], x[2])):
            while stack and stack[-1][0] < ts:
                stack.pop()
            if kind == 0:
                stack.append((ts - neg_dur, val))
            else:
                out[val] = stack[-1][1] if stack else "(no op)"
    return out


def breakdown(trace: dict, steps: int, top_n: int = 15) -> dict:
    """Per-step averages (ms) by category from a chrome trace of `steps` traced steps."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    opt_ranges = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                        if e.get("cat") == "user_annotation" and e["name"].startswith("Optimizer.step"))
    # Kernel -> the CPU launch that issued it (same correlation id), to find optimizer kernels.
    launch_ts = {e["args"]["correlation"]: e["ts"] for e in events
                 if e.get("cat") in _RUNTIME and "correlation" in e.get("args", {})}

    def in_opt(corr) -> bool:
        t = launch_ts.get(corr)
        return t is not None and any(s <= t <= e for s, e in opt_ranges)

    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    op_of = _launching_ops(events)
    per_cat = dict.fromkeys(CATEGORIES, 0.0)
    per_kernel: dict[str, list[float]] = {}
    per_op: dict[tuple[str, str], list[float]] = {}  # (launching op, category) -> [us, calls]
    for e in gpu:
        corr = e.get("args", {}).get("correlation")
        c = classify(e["name"], e["cat"], in_opt(corr))
        op = op_of.get(corr, "(unknown)")
        per_cat[c] += e["dur"]
        k = per_kernel.setdefault(e["name"], [0.0, 0, c, op])
        k[0] += e["dur"]
        k[1] += 1
        o = per_op.setdefault((op, c), [0.0, 0])
        o[0] += e["dur"]
        o[1] += 1
    intervals = [(e["ts"], e["ts"] + e["dur"]) for e in gpu]
    span = (max(e for _, e in intervals) - min(s for s, _ in intervals)) if intervals else 0.0
    busy = _busy(intervals)
    launches = [e for e in events if e.get("cat") in _RUNTIME and e["name"] in _LAUNCH]
    ms = 1e-3 / max(1, steps)  # trace times are microseconds; per-step milliseconds
    out = {c: v * ms for c, v in per_cat.items()}
    out["idle gaps"] = (span - busy) * ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top_n]
    top_ops = sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top_n]
    return {
        "per_step_ms": out,
        "gpu_span_ms": span * ms,
        "gpu_busy_ms": busy * ms,
        "kernels_per_step": len(gpu) / max(1, steps),
        "launch_calls_per_step": len(launches) / max(1, steps),
        "launch_cpu_ms": sum(e["dur"] for e in launches) * ms,
        "top_kernels": [{"name": n[:120], "ms": v[0] * ms, "calls": v[1] / max(1, steps), "category": v[2],
                         "op": v[3][:80]} for n, v in top],
        # GPU time by the CPU op that launched it (aten op, or the compiled graph's wrapper)
        "top_ops": [{"op": o[:100], "category": c, "ms": v[0] * ms, "calls": v[1] / max(1, steps)}
                    for (o, c), v in top_ops],
    }


def markdown(b: dict, meta: dict) -> str:
    span = b["gpu_span_ms"] or 1.0
    lines = [f"Step profile ({meta['date']}, {meta['gpu']}, torch {meta['torch']}): {meta['shape']}, "
             f"seq {meta['seq']}, micro-batch {meta['micro_batch']}, {meta['sets'] or 'default flags'}; "
             f"{meta['active']} traced steps after {meta['warmup']} warm-up; step wall "
             f"{meta['step_ms']:.1f} ms (untraced), {meta['tokens_per_s']:,.0f} tokens/s.", "",
             "| category | ms / step | share of GPU span |", "|---|---|---|"]
    for c, v in b["per_step_ms"].items():
        lines.append(f"| {c} | {v:.2f} | {100 * v / span:.1f}% |")
    lines += [f"| **GPU span** | {span:.2f} | 100% |", "",
              f"Kernels per step: {b['kernels_per_step']:.0f}; launch calls per step: "
              f"{b['launch_calls_per_step']:.0f}, {b['launch_cpu_ms']:.2f} ms of CPU time in them.", "",
              "| top kernels | category | ms / step | calls / step |", "|---|---|---|---|"]
    for k in b["top_kernels"]:
        lines.append(f"| `{k['name'][:80]}` | {k['category']} | {k['ms']:.2f} | {k['calls']:.0f} |")
    lines += ["", "| launching op | category | ms / step | kernels / step |", "|---|---|---|---|"]
    for o in b.get("top_ops", []):
        lines.append(f"| `{o['op'][:70]}` | {o['category']} | {o['ms']:.2f} | {o['calls']:.0f} |")
    return "\n".join(lines) + "\n"


def profile(args) -> tuple[dict, dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile

    from bench_clm import build_trainer, parse_sets, synthetic_step_batches

    args.variant = "tunesmith"
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tr, model, _, _ = build_trainer(args, compile_blocks=cuda, sets=parse_sets(args.set))
    total = args.warmup + args.active + args.timed
    batches = list(synthetic_step_batches(model.cfg.vocab_size, args.seq, args.micro_batch, total))
    for b in batches[:args.warmup]:
        tr.train_step([b])
    sync()
    t0 = time.perf_counter()  # untraced steady steps: the wall time the profile is set against
    for b in batches[args.warmup:args.warmup + args.timed]:
        tr.train_step([b])
    sync()
    step_s = (time.perf_counter() - t0) / max(1, args.timed)
    trace_path = args.out / f"trace{args.tag}.json"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with tprofile(activities=activities) as prof:
        for b in batches[args.warmup + args.timed:]:
            tr.train_step([b])
        sync()
    prof.export_chrome_trace(str(trace_path))
    trace = json.loads(trace_path.read_text())
    with gzip.open(str(trace_path) + ".gz", "wt") as fh:  # smaller to bring back
        json.dump(trace, fh)
    trace_path.unlink()
    meta = {"date": time.strftime("%Y-%m-%d", time.gmtime()),
            "gpu": torch.cuda.get_device_name() if cuda else "CPU",
            "torch": torch.__version__, "shape": args.shape, "seq": args.seq,
            "micro_batch": args.micro_batch, "sets": ", ".join(args.set), "warmup": args.warmup,
            "active": args.active, "step_ms": step_s * 1e3,
            "tokens_per_s": args.seq * args.micro_batch / step_s}
    return breakdown(trace, args.active, args.top), meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shape", default="llama3.2-1b")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: an eager smoke run of the script (no GPU kernels to break down)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5, help="steps before timing (compile, allocator)")
    p.add_argument("--timed", type=int, default=5, help="untraced steps timed for the wall time")
    p.add_argument("--active", type=int, default=3, help="traced steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="recipe key to change (repeatable), e.g. optim.in_backward=true")
    p.add_argument("--top", type=int, default=40, help="rows of the kernel and op tables")
    p.add_argument("--tag", default="", help="suffix of the output names (profile{tag}.json)")
    args = p.parse_args(argv)
    args.steps = args.warmup + args.timed + args.active
    args.out.mkdir(parents=True, exist_ok=True)
    b, meta = profile(args)
    (args.out / f"profile{args.tag}.json").write_text(json.dumps({"meta": meta, **b}, indent=2))
    md = markdown(b, meta)
    (args.out / f"profile{args.tag}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
