"""MoE tensor and expert parallelism on 2 CUDA GPUs (NCCL): parity with one GPU, and speed.

    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/moe_par_device.py --out $OUT/moe_par

Needs 2 GPUs (nvidia-h200-x2). Each step runs as its own subprocess under a time limit (a failure
is recorded, the rest go on); results land in OUT/moe_par.json and OUT/moe_par.md. Steps:

  parity_fp32   moe-tiny (Qwen3-MoE style, a seeded init saved in HF format), 4 optimizer steps
                of `tunesmith train` on one GPU, then on 2 GPUs (one torchrun) with tp=2 and
                with ep=2 (FSDP2 + expert parallelism), fp32: per-step loss and grad norm, and the
                final HF export, against one GPU (the CPU suite's tolerances: loss 1e-4, grad norm
                1e-3 relative, weights 1e-4)
  parity_bf16   the same in bf16 (fp32 master weights, bf16 autocast: the experts take the
                grouped GEMM on Hopper); the differences are reported, judged against loose
                bounds (loss 2e-2, grad norm 5e-2 relative)
  speed_fsdp / speed_ep
                tokens/s of the production training step (benchmarks/bench_fsdp.py: compiled
                blocks, fused loss, fused AdamW, synthetic tokens) on Qwen3-30B-A3B cut to
                4 layers, sequence 2048, micro-batch 2 per GPU, bf16, eager (compile time would
                not fit the budget; the experts under EP are never compiled): FSDP2 full_shard on 2 GPUs
                (every expert all-gathered per layer) vs ep=2 (each GPU keeps its 64 experts and
                exchanges tokens by all-to-all)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # tunesmith, and tests.distributed.helpers
STEPS = {"parity_fp32": 60, "parity_bf16": 50, "speed_fsdp": 60, "speed_ep": 60}
BUDGET_S = 232
LOSS_ATOL, GRAD_RTOL, WEIGHT_ATOL = 1e-4, 1e-3, 1e-4
BF16_LOSS_ATOL, BF16_GRAD_RTOL = 2e-2, 5e-2
LAYOUTS = {"tp2": (1, ("parallel.tp=2",)), "ep2": (2, ("parallel.ep=2",))}


DEVICE = os.environ.get("MOE_PAR_DEVICE", "cuda")  # cpu: a smoke test of the parity steps (gloo)


def _env() -> dict:
    return {**os.environ, "NCCL_NVLS_ENABLE": "0", "TUNESMITH_TEST_DEVICE": DEVICE,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _compare(got: list, want: list, loss_atol: float, grad_rtol: float) -> dict:
    dl = max(abs(a[0] - b[0]) for a, b in zip(got, want, strict=True))
    dg = max(abs(a[1] - b[1]) / b[1] for a, b in zip(got, want, strict=True))
    return {"max_loss_diff": dl, "max_grad_norm_rel_diff": dg,
            "ok": len(got) == len(want) == 4 and dl < loss_atol and dg <= grad_rtol}


def parity(out: Path, precision: str) -> dict:
    """One GPU, then tp=2 and ep=2 in one torchrun, on the same init and global batch."""
    import torch
    from safetensors.torch import load_file

    os.environ["TUNESMITH_TEST_DEVICE"] = DEVICE  # before helpers reads it
    from tests.distributed.helpers import job, losses, save_init
    from tunesmith.cli.demo import train_tokenizer, write_corpus

    root = out / f"parity_{precision}"
    train, valid = write_corpus(root / "data", seed=0)
    tok = train_tokenizer(train, root / "tokenizer", vocab_size=512)
    init = save_init(root / "init", preset="moe-tiny", overrides="model.overrides={}")
    data = (tok, train, valid)
    prec = (f"train.precision={precision}",)
    ref = job(*data, root / "ref", init=init, extra=prec)
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "-q", "train", *ref], env=_env(),
                          capture_output=True, text=True)
    if proc.returncode:
        return {"error": "one-GPU run failed", "log_tail": proc.stderr[-2000:]}
    jobs = [job(*data, root / name, dp=dp, init=init, extra=(*extra, *prec))
            for name, (dp, extra) in LAYOUTS.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(ROOT / "tests/distributed/_worker.py"),
                           str(root / "jobs.json")], env=_env(), capture_output=True, text=True)
    if proc.returncode:
        return {"error": "2-GPU runs failed", "log_tail": proc.stderr[-3000:]}
    fp32 = precision == "fp32"
    want = load_file(root / "ref" / "final" / "model.safetensors")
    result: dict = {"torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"}
    for name in LAYOUTS:
        r = _compare(losses(root / name), losses(root / "ref"),
                     LOSS_ATOL if fp32 else BF16_LOSS_ATOL, GRAD_RTOL if fp32 else BF16_GRAD_RTOL)
        got = load_file(root / name / "final" / "model.safetensors")
        r["max_weight_diff"] = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
        r["same_keys"] = got.keys() == want.keys()
        r["ok"] = r["ok"] and r["same_keys"] and (not fp32 or r["max_weight_diff"] < WEIGHT_ATOL)
        result[name] = r
    return result


def speed(out: Path, ep: int) -> dict:
    name = f"speed_{'ep' if ep > 1 else 'fsdp'}"
    cmd = [sys.executable, str(ROOT / "benchmarks/bench_fsdp.py"), "--gpus", "2",
           "--shape", "qwen3-30b-a3b", "--n-layers", "4", "--seq", "2048", "--micro-batch", "2",
           "--steps", "8", "--warmup", "3", "--ep", str(ep), "--no-compile",
           "--json", str(out / f"{name}.json")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if not (out / f"{name}.json").exists():
        return {"error": "failed", "log_tail": proc.stderr[-3000:]}
    return json.loads((out / f"{name}.json").read_text())["results"][0]


def child(name: str, out: Path) -> dict:
    if name.startswith("parity_"):
        return parity(out, name.split("_")[1])
    return speed(out, 2 if name == "speed_ep" else 1)


def _markdown(results: dict) -> str:
    lines = ["# MoE TP / EP on 2 GPUs", ""]
    for prec in ("fp32", "bf16"):
        r = results.get(f"parity_{prec}", {})
        if "error" in r:
            lines.append(f"- parity {prec}: {r['error']}")
            continue
        for name in LAYOUTS:
            x = r.get(name, {})
            lines.append(f"- parity {prec} {name}: ok={x.get('ok')} loss diff {x.get('max_loss_diff')}, "
                         f"grad-norm rel diff {x.get('max_grad_norm_rel_diff')}, "
                         f"weight diff {x.get('max_weight_diff')}")
    lines += ["", "| layout | tokens/s (2 GPUs) | tokens/s/GPU | peak alloc GiB | step s |", "|---|---|---|---|---|"]
    for name in ("speed_fsdp", "speed_ep"):
        r = results.get(name, {})
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | |")
        elif r:
            lines.append(f"| {r['layout']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                         f"{r['peak_mem_alloc_gib']:.1f} | {r['median_step_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.step:
        print("RESULT " + json.dumps(child(args.step, out)), flush=True)
        return
    t0, results = time.monotonic(), {}
    for name, limit in STEPS.items():
        left = BUDGET_S - (time.monotonic() - t0)
        if left < 20:
            results[name] = {"error": "skipped: out of time budget"}
            continue
        # A session of its own: on timeout the whole group goes (torchrun and its workers too),
        # so no rank keeps a GPU busy for the next step.
        proc = subprocess.Popen([sys.executable, __file__, "--out", str(out), "--step", name], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=min(limit, left))
            lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
            results[name] = (json.loads(lines[-1][7:]) if lines
                             else {"error": f"exit {proc.returncode}", "log_tail": stderr[-3000:]})
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            results[name] = {"error": f"timeout after {min(limit, left):.0f} s"}
        print(f"{name}: {json.dumps(results[name])[:400]}", flush=True)
    (out / "moe_par.json").write_text(json.dumps(results, indent=2))
    (out / "moe_par.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
