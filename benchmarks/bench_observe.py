"""Honest throughput and observability overhead on one GPU (issue #12's GPU check).

    PYTHONPATH=src python3 benchmarks/bench_observe.py --out $OUT/observe

Three fresh processes on the same shape (default Llama-3.2-1B, seq 2048, micro-batch 8, bf16,
compiled blocks):
  1. bench      benchmarks/bench_clm.py's `tunesmith` variant: Trainer.train_step timed alone.
  2. plain      a real `tunesmith train` run, evaluation every 50 steps, no trackers, no report.
  3. observed   the same run with every installed tracker (tensorboard, mlflow file store, wandb
                offline, trackio local), the HTML report, a profiled window with a CUDA memory
                snapshot, and the FLOP counter.
Checks: plain's summary.json tokens/s within 3% of bench's; observed's within 1% of plain's
(tracker + report overhead), with tracker_s/report_s next to it. Writes result.json and
result.md under --out (plus both run directories).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _variants import run_variant  # noqa: E402


def _data(root: Path) -> tuple[Path, Path]:
    """A small BPE tokenizer and text from Python's bundled docs (no download), as the demo; the
    text repeated so that the whole run is one epoch (~150k tokens per copy)."""
    from tunesmith.cli.demo import train_tokenizer, write_corpus

    train, _ = write_corpus(root / "data", seed=0)
    tok = train_tokenizer(train, root / "tokenizer", vocab_size=512)
    big = root / "data" / "train_x16.txt"
    big.write_text(train.read_text(encoding="utf-8") * 16, encoding="utf-8")
    return big, tok


def _train(out: Path, args, train: Path, tok: Path, extra: list[str], env: dict) -> dict:
    ov = [f"model.name={args.shape}", f"model.tokenizer={tok}", f"data.path={train}",
          f"data.block_size={args.seq}", f"data.validation_path={train.parent / 'valid.txt'}",
          f"train.micro_batch_size={args.micro_batch}", f"train.max_steps={args.steps}",
          "train.precision=bf16", "train.compile=true", f"train.throughput_warmup_steps={args.warmup}",
          "optim.lr=1e-4", "optim.weight_decay=0.1", "schedule.name=constant",
          "eval.every_steps=50", "eval.max_batches=20", "logging.steps=10", "logging.progress=false",
          f"output.dir={out}", "output.overwrite=true", "output.save_final=false", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli.main", "train", *ov], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train run {out.name} failed:\n{proc.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["process_s"] = time.perf_counter() - t0
    return summary


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3.2-1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default="bench_observe")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_ALLOW_FILE_STORE="true",
               TRACKIO_DIR=str(out / "trackio"), WANDB_CONFIG_DIR=str(out / "wandb-config"),
               WANDB_CACHE_DIR=str(out / "wandb-cache"))
    train, tok = _data(out)

    bench = run_variant(str(ROOT / "benchmarks" / "bench_clm.py"), "tunesmith", [
        "--shape", args.shape, "--seq", str(args.seq), "--micro-batch", str(args.micro_batch),
        "--steps", str(args.steps // 2), "--warmup", str(args.warmup)])
    plain = _train(out / "plain", args, train, tok, ["logging.report=false"], env)
    trackers = [t for t in ("tensorboard", "mlflow", "wandb", "trackio") if importlib.util.find_spec(t)]
    observed = _train(out / "observed", args, train, tok, [
        f"logging.trackers=[{','.join(trackers)}]", "logging.report=true",
        "profile.steps=[30,31]", "profile.memory_snapshot=true", "profile.count_flops=true",
        "profile.flop_counter_start=20"], env)

    vs_bench = plain["tokens_per_s"] / bench["tokens_per_s"] - 1 if "tokens_per_s" in bench else None
    overhead = 1 - observed["tokens_per_s"] / plain["tokens_per_s"]
    snap = out / "observed" / "profile" / "memory_snapshot_rank0.pickle"
    result = {
        "args": vars(args), "bench_clm": bench, "plain": plain, "observed": observed, "trackers": trackers,
        "summary_vs_bench": vs_bench, "summary_vs_bench_ok": vs_bench is not None and abs(vs_bench) <= 0.03,
        "observe_overhead": overhead, "observe_overhead_ok": overhead < 0.01,
        "tracker_report_s_share": (observed.get("tracker_s", 0) + observed.get("report_s", 0)) / observed["runtime_s"],
        "memory_snapshot": snap.is_file(),
        "health_fields": sorted({k for line in (out / "observed" / "metrics.jsonl").read_text().splitlines()
                                 for k in json.loads(line) if k.startswith(("mem_", "gpu_"))}), "trace": sorted(str(t) for t in (out / "observed" / "profile").glob("trace_*")),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    fmt = lambda v: f"{v:,.0f}"  # noqa: E731
    md = [f"{args.shape}, seq {args.seq}, micro-batch {args.micro_batch}, {args.steps} steps, eval every 50, "
          f"{bench.get('gpu', '?')}, torch {bench.get('torch', '?')}", "",
          "| run | train tokens/s | MFU | eval_s | checkpoint_s | tracker_s | report_s | runtime_s |",
          "|---|---|---|---|---|---|---|---|",
          f"| bench_clm (train_step alone, median) | {fmt(bench.get('tokens_per_s', 0))} | "
          f"{100 * (bench.get('mfu') or 0):.1f}% | | | | | |"]
    for name, s in (("tunesmith train, no trackers", plain), (f"+ {', '.join(trackers)}, report, profiler", observed)):
        md.append(f"| {name} | {fmt(s['tokens_per_s'])} | {100 * (s.get('mfu') or 0):.1f}% | "
                  f"{s.get('eval_s', 0):.1f} | {s.get('checkpoint_s', 0):.1f} | {s.get('tracker_s', 0):.2f} | "
                  f"{s.get('report_s', 0):.2f} | {s['runtime_s']:.0f} |")
    md += ["", f"summary.json vs bench_clm: {100 * vs_bench:+.2f}% (within 3%: {result['summary_vs_bench_ok']})"
           if vs_bench is not None else "bench_clm failed",
           f"tracker + report overhead on train tokens/s: {100 * overhead:+.2f}% (under 1%: "
           f"{result['observe_overhead_ok']}); memory snapshot written: {result['memory_snapshot']}; "
           f"GPU health fields: {', '.join(result['health_fields'])}",
           f"measured/formula FLOPs: {observed.get('measured_vs_formula')}; top kernels: {observed.get('top_kernels')}"]
    (out / "result.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
