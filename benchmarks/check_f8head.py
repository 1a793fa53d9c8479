"""GPU checks of the fused loss's LM head: the fp32-in-GEMM weight-gradient sum and the float8 head.

    PYTHONPATH=src python3 benchmarks/check_f8head.py --out /tmp/f8head

Parts (accum + float8 in one process, train in another, each under a time limit; each part
writes OUT/<part>.json as soon as it is done, then OUT/summary.json holds all):
  accum    Llama-3 head [128256, 2048], 8192 tokens, bf16 matmuls, fp32 weight: loss, dH, dW of
           the accumulation mode this torch build probes ("addmm" / "mm") against the old
           "cast" path (bf16 chunk product, cast, add), both against an fp32 reference (TF32
           off) on the same bf16 inputs; and each mode's time for forward + backward.
  float8   the same head, 16384 tokens (the 1B benchmark's micro-batch): float8 head vs bf16 head:
           loss, dH, dW relative error and cosine vs the bf16 head, and both times.
  train    a tiny Llama through `tunesmith train` (float8 tensorwise, every aligned layer):
           per-step losses with the head in float8 (float8_skip=[]) and in bf16 (default).
Exit 1 when a part fails or a check is off.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

V, D = 128256, 2048
DEV = "cuda"  # --device cpu: a smoke test of this script at V, D = 1024, 64 (float8 parts skipped)
# Seconds per process, compile included; typical on one H200: ~60 s and ~70 s.
LIMITS = {"kernels": 110, "train": 120}
PROCESSES = {"kernels": ("accum", "float8"), "train": ("train",)}


def _problem(n: int, seed: int = 0):
    import torch

    g = torch.Generator(device=DEV).manual_seed(seed)
    h = torch.randn(n, D, device=DEV, generator=g).bfloat16().requires_grad_()  # final-norm scale
    w = (torch.randn(V, D, device=DEV, generator=g) * 0.02).requires_grad_()  # fp32 master
    y = torch.randint(0, V, (n,), device=DEV, generator=g)
    y[::11] = -100
    return h, w, y


def _run(h, w, y, reps: int = 3, **kw):
    """(loss, dH, dW) of one forward + backward, and its median time in ms over `reps` more."""
    import torch

    from tunesmith.objective.loss import linear_cross_entropy

    def once():
        h.grad = w.grad = None
        out = linear_cross_entropy(h, w, y, **kw)
        out.backward()
        return out.detach()

    def sync():
        if DEV == "cuda":
            torch.cuda.synchronize()

    out = once()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        once()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    ms = sorted(times)[len(times) // 2] if times else None
    return (out.double(), h.grad.double(), w.grad.double()), ms


def _compare(got, want) -> dict:
    import torch

    names = ("loss", "dH", "dW")
    res = {}
    for name, a, b in zip(names, got, want):
        res[name] = {"max_abs_diff": float((a - b).abs().max()),
                     "rel_err": float((a - b).norm() / b.norm()),
                     "cos": float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))}
    return res


def part_accum() -> dict:
    import torch

    from tunesmith.objective import loss as L

    h, w, y = _problem(8192)
    torch.backends.cuda.matmul.allow_tf32 = False
    ref, _ = _run(h.detach().float().requires_grad_(), w, y, reps=0, compute_dtype=torch.float32)
    key = L.grad_w_mode_key(h.device, torch.bfloat16)
    L._GRAD_W_MODES.pop(key, None)
    probed = L._grad_w_mode(h.device, torch.bfloat16, torch.empty(1))  # what training would use
    res = {"probed_mode": probed, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu"}
    runs = {}
    for mode in dict.fromkeys([probed, "mm", "cast"]):
        L._GRAD_W_MODES[key] = mode
        try:
            runs[mode], ms = _run(h, w, y, compute_dtype=torch.bfloat16)
        except RuntimeError as e:
            res[mode] = {"error": str(e).splitlines()[0]}
            continue
        res[mode] = {"ms_fwd_bwd": ms, "vs_fp32_reference": _compare(runs[mode], ref)}
    L._GRAD_W_MODES.pop(key, None)
    if probed in runs and "cast" in runs:
        res["new_vs_old"] = _compare(runs[probed], runs["cast"])
        new, old = (res[m]["vs_fp32_reference"]["dW"]["rel_err"] for m in (probed, "cast"))
        res["ok"] = new <= old * 1.01 and res["new_vs_old"]["loss"]["rel_err"] < 1e-5
    else:
        res["ok"] = False
    return res


def part_float8() -> dict:
    import torch

    cap = torch.cuda.get_device_capability() if DEV == "cuda" else None
    if cap is not None and cap < (8, 9):
        return {"skipped": f"compute capability {cap} has no float8", "ok": True}
    h, w, y = _problem(16384)
    bf16, ms_bf16 = _run(h, w, y, compute_dtype=torch.bfloat16)
    f8, ms_f8 = _run(h, w, y, compute_dtype=torch.bfloat16, float8="tensorwise")
    cmp = _compare(f8, bf16)
    return {"ms_fwd_bwd_bf16": ms_bf16, "ms_fwd_bwd_float8": ms_f8, "float8_vs_bf16": cmp,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cap else None,
            "ok": cmp["loss"]["rel_err"] < 5e-3 and cmp["dH"]["cos"] > 0.99 and cmp["dW"]["cos"] > 0.99}


def part_train(out: Path) -> dict:
    """Same tiny run twice (float8 tensorwise, all aligned layers): head float8 vs head bf16."""
    from check_lowmem import straight_losses  # noqa: E402  (benchmarks/ is the script's dir)

    from tunesmith.cli.demo import train_tokenizer, write_corpus

    root = out / "train"
    data, _ = write_corpus(root / "data", seed=0)
    tok = train_tokenizer(data, root / "tokenizer", vocab_size=512)
    f8 = {"train.float8": "tensorwise", "train.float8_filter": "all", "train.precision": "bf16"}
    head_f8 = straight_losses(root, tok, data, "head-float8", 30, **f8, **{"train.float8_skip": "[]"})
    head_bf16 = straight_losses(root, tok, data, "head-bf16", 30, **f8)
    last = max(head_bf16)
    rel = abs(head_f8[last] - head_bf16[last]) / head_bf16[last]
    return {"losses_head_float8": head_f8, "losses_head_bf16": head_bf16,
            "last_step_rel_diff": rel, "ok": rel < 0.02}


def child(process: str, out: Path) -> None:
    for part in PROCESSES[process]:
        t0 = time.perf_counter()
        res = {"accum": part_accum, "float8": part_float8}[part]() if part != "train" else part_train(out)
        res["seconds"] = time.perf_counter() - t0
        (out / f"{part}.json").write_text(json.dumps(res, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--processes", default="kernels,train", help="kernels (accum, float8), train")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test only")
    args = p.parse_args()
    if args.device == "cpu":
        global DEV, V, D
        DEV, V, D = "cpu", 1024, 64
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        return child(args.part, out)
    summary = {}
    for process in args.processes.split(","):
        for part in PROCESSES[process]:
            (out / f"{part}.json").unlink(missing_ok=True)  # never report an earlier run's result
        error = None
        try:
            proc = subprocess.run([sys.executable, __file__, "--part", process, "--out", str(out),
                                   "--device", args.device],
                                  capture_output=True, text=True, timeout=LIMITS[process])
            if proc.returncode:
                error = (proc.stderr or proc.stdout)[-3000:]
        except subprocess.TimeoutExpired:
            error = f"timed out after {LIMITS[process]} s"
        for part in PROCESSES[process]:  # what finished before a failure or the time limit
            done = out / f"{part}.json"
            summary[part] = json.loads(done.read_text()) if done.exists() else {"ok": False, "error": error}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    sys.exit(0 if all(r.get("ok") for r in summary.values()) else 1)


if __name__ == "__main__":
    main()
