"""Training steps of the demo's model on CPU under different thread settings, alone or next to
competing CPU-bound processes (issue #17: the demo on a busy machine).

Each variant runs in a fresh subprocess (OpenMP reads its environment once, at load) doing
`--steps` forward/backward/AdamW steps of the demo's 1.4M-parameter Llama on random tokens
(batch 16 x 128, as the demo). It reports wall seconds and the process's user+system CPU
seconds; CPU time far above wall x threads-used means threads spin while waiting for each other.
Variants are interleaved round by round so drifting background load hits them alike.

    PYTHONPATH=src python3 benchmarks/cpu_threads.py --steps 30 --rounds 3 --competitors 2 \
        --variant spin2=OMP_NUM_THREADS=2,OMP_WAIT_POLICY=ACTIVE \
        --variant passive2=OMP_NUM_THREADS=2,OMP_WAIT_POLICY=PASSIVE \
        --variant one=OMP_NUM_THREADS=1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BUSY = "while True: pass"
THREAD_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS",
               "TUNESMITH_CPU_THREADS")


def worker(steps: int) -> None:
    import torch
    import torch.nn.functional as F

    from tunesmith.cli.demo import DEMO_RECIPE
    from tunesmith.models import build_model, resolve_model_config

    family, cfg = resolve_model_config("tiny", DEMO_RECIPE["model"]["overrides"])
    torch.manual_seed(0)
    model = build_model(family, cfg, device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (16, 128))  # [B, T], the demo's micro-batch

    def step() -> None:
        logits = model(ids)  # [B, T, V]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: allocator, OpenMP team
        step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"wall_s": round(t1 - t0, 2), "cpu_s": round(cpu, 2),
                      "threads": torch.get_num_threads()}))


def run_variant(env_extra: dict[str, str], steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(env_extra)
    out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(steps)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=[], help="NAME=VAR=V[,VAR=V...]")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--competitors", type=int, default=0, help="busy-loop processes alongside")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.steps)
    variants = []
    for text in args.variant:
        name, _, rest = text.partition("=")
        variants.append((name, dict(kv.split("=", 1) for kv in rest.split(",") if kv)))
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.competitors)]
    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    try:
        for r in range(args.rounds):
            for name, env in variants:
                res = run_variant(env, args.steps) | {"load_1m": round(os.getloadavg()[0], 1)}
                results[name].append(res)
                print(f"round {r + 1} {name}: {res}", flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    summary = {name: {k: round(sum(r[k] for r in rows) / len(rows), 2) for k in ("wall_s", "cpu_s")}
               for name, rows in results.items()}
    for name, mean in summary.items():
        print(f"{name}: mean over {args.rounds} rounds of {args.steps} steps: {mean}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "steps": args.steps, "competitors": args.competitors, "results": results,
            "mean": summary}, indent=2))


if __name__ == "__main__":
    main()
