"""Quality guard for every speed/memory mode (issue #14 item 5): eval loss vs a bf16 baseline.

    PYTHONPATH=src python3 benchmarks/quality_guard.py --out OUT            # one H200, ~5 min
    PYTHONPATH=src python3 benchmarks/quality_guard.py --out OUT --device cpu --steps 5   # smoke

Real data (../shared/data): Tiny Shakespeare + WikiText-2 valid to train, WikiText-2 test to
evaluate, the Llama 3 tokenizer. The model is the llama3.2-1b preset shrunk to ~174M parameters
(dim 768, 12 layers, tied 128256-token embedding: 98.5M of the 174M). Every mode is a real
`tunesmith train` run (the CLI in its own process on CUDA; the Python API `tunesmith.train` in
process with --in-process) from the same recipe, seed and data order, so every mode sees the
same batches in the same order and starts from the same weights. A mode passes when its final
eval loss is within --tol (1%) of its baseline's:

    bf16 (compiled blocks, fp32 master weights, fused AdamW)      the baseline of every mode
    float8-tensorwise / float8-rowwise   train.float8, float8_filter=all (the auto rule would
                                         keep this small model's layers in bf16: nothing tested)
    float8-head                          float8-tensorwise plus the LM head in float8 inside the
                                         fused loss (train.float8_skip=[])
    adamw8bit / adamw4bit                8-/4-bit moments, fp32 master weights
    bf16-pure-sr / adamw8bit-bf16-pure-sr  bf16 weights, no master copy, stochastic rounding
    bf16-residual                        train.residual_dtype=bf16 (the stream between blocks)
    float8-head-bf16-residual            float8-head with the bf16 residual stream
    ac-full / ac-selective               activation checkpointing
    eager                                compile off
    lora-float8                          LoRA r16 on the trained baseline with a float8 frozen
                                         base; its own baseline is lora-bf16 (bf16 base)

The chunked cross-entropy is the only loss path tunesmith has (no mode turns it off), so it is
in every row. Modes that need CUDA (float8, compile) are skipped on CPU with that reason.

Writes OUT/result.json (every number, each run's summary), OUT/result.md (a table for
benchmarks/RESULTS.md) and OUT/logs/MODE.log (CLI runs); the runs themselves go to --work.
Exit status 0 even when a mode fails the tolerance: the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The device machine gets only the checkout: there the data travels as ./shared/data (copied
# in, untracked); on a developer's machine it sits beside the checkout as ../shared/data.
DATA_DIRS = (ROOT / "shared" / "data", ROOT.parent / "shared" / "data")
TRAIN_FILES = ("text/tinyshakespeare/input.txt", "text/wikitext-2/wiki.valid.raw")
EVAL_FILE = "text/wikitext-2/wiki.test.raw"
TOKENIZER = "tokenizers/llama3/hf"

# ~174M parameters: 12 x 6.3M in the blocks + 98.5M tied embedding (Llama 3 vocabulary).
MODEL_170M = {"dim": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 4, "head_dim": 64,
              "intermediate_size": 2048}
MODEL_TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
              "intermediate_size": 128}

# name -> (baseline, recipe changes, needs CUDA). Changes are dotted keys into the recipe.
MODES: dict[str, tuple[str | None, dict[str, Any], bool]] = {
    "bf16": (None, {}, False),
    "float8-tensorwise": ("bf16", {"train.float8": "tensorwise", "train.float8_filter": "all"}, True),
    "float8-rowwise": ("bf16", {"train.float8": "rowwise", "train.float8_filter": "all"}, True),
    "float8-head": ("bf16", {"train.float8": "tensorwise", "train.float8_filter": "all",
                             "train.float8_skip": []}, True),
    "adamw8bit": ("bf16", {"optim.name": "adamw8bit"}, False),
    "adamw4bit": ("bf16", {"optim.name": "adamw4bit"}, False),
    "bf16-pure-sr": ("bf16", {"train.precision": "bf16-pure", "optim.bf16_stochastic_round": True}, True),
    "adamw8bit-bf16-pure-sr": ("bf16", {"optim.name": "adamw8bit", "train.precision": "bf16-pure",
                                        "optim.bf16_stochastic_round": True}, True),
    "bf16-residual": ("bf16", {"train.residual_dtype": "bf16"}, True),
    "float8-head-bf16-residual": ("bf16", {"train.float8": "tensorwise", "train.float8_filter": "all",
                                           "train.float8_skip": [], "train.residual_dtype": "bf16"}, True),
    "ac-full": ("bf16", {"parallel.activation_checkpointing": "full"}, False),
    "ac-selective": ("bf16", {"parallel.activation_checkpointing": "selective"}, False),
    "eager": ("bf16", {"train.compile": False}, True),
    "lora-bf16": (None, {"peft.method": "lora", "peft.r": 16, "peft.alpha": 32,
                         "peft.base_dtype": "bf16"}, False),
    "lora-float8": ("lora-bf16", {"peft.method": "lora", "peft.r": 16, "peft.alpha": 32,
                                  "peft.base_dtype": "float8"}, True),
}
LORA = ("lora-bf16", "lora-float8")


def _set(d: dict, dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d.setdefault(k, {})
    d[last] = value


def _place(src: Path, dst: Path, max_chars: int | None) -> None:
    """A link to the data file, or (--max-chars, the CPU smoke) its first max_chars characters."""
    if dst.exists() or dst.is_symlink():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if max_chars is None:
        dst.symlink_to(src.resolve())  # a relative --data would leave the link dangling
    else:
        with open(src, encoding="utf-8", newline="") as fh:
            dst.write_text(fh.read(max_chars), encoding="utf-8", newline="")


def base_recipe(args, out: Path) -> dict[str, Any]:
    """The recipe every mode starts from (train files linked into one folder: data.path reads a
    directory of text files)."""
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for rel in (*TRAIN_FILES, EVAL_FILE):
        _place(args.data / rel, data_dir / ("eval" if rel == EVAL_FILE else "train") / Path(rel).name,
               args.max_chars)
    cuda = args.device == "cuda"
    return {
        "model": {"name": "llama3.2-1b", "overrides": MODEL_170M if cuda else MODEL_TINY,
                  "tokenizer": str(args.data / TOKENIZER)},
        "data": {"path": str(data_dir / "train"),
                 "validation_path": str(data_dir / "eval" / Path(EVAL_FILE).name), "mode": "packed",
                 "block_size": args.seq, "cache_dir": str(out / "cache")},
        "optim": {"lr": args.lr, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "schedule": {"name": "cosine", "warmup_steps": max(1, args.steps // 10), "min_lr_ratio": 0.1},
        "train": {"device": args.device, "precision": "bf16", "micro_batch_size": args.micro_batch,
                  "max_steps": args.steps, "compile": cuda, "seed": 0},
        "eval": {"at_end": True, "max_batches": args.eval_batches},
        "logging": {"steps": max(1, args.steps // 10), "progress": False, "report": False},
        "output": {"overwrite": True, "save_final": False},
    }


def mode_recipe(args, out: Path, mode: str) -> dict[str, Any]:
    recipe = json.loads(json.dumps(base_recipe(args, out)))
    recipe["output"]["dir"] = str(out / "runs" / mode)
    if mode == "bf16":
        recipe["output"]["save_final"] = True  # the LoRA modes' base model
    if mode in LORA:
        recipe["model"] = {"name": str(out / "runs" / "bf16" / "final"),
                           "tokenizer": str(args.data / TOKENIZER)}
        recipe["train"]["max_steps"] = max(1, args.steps // 2)
        recipe["optim"]["lr"] = args.lr * 2
    for key, value in MODES[mode][1].items():
        _set(recipe, key, value)
    return recipe


def run_mode(args, out: Path, mode: str) -> dict[str, Any]:
    """One `tunesmith train` run; its summary.json plus wall time, or the error."""
    recipe = mode_recipe(args, out, mode)
    run_dir = Path(recipe["output"]["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.in_process:
        import tunesmith

        try:
            summary = tunesmith.train(recipe)
        except Exception as e:  # noqa: BLE001  (the table reports any failure of a mode)
            return {"error": f"{type(e).__name__}: {e}", "wall_s": time.perf_counter() - t0}
    else:
        cfg_path = out / "recipes" / f"{mode}.json"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(json.dumps(recipe, indent=1))
        yaml_path = cfg_path.with_suffix(".yaml")  # JSON is YAML: the CLI reads it as a recipe
        yaml_path.write_text(cfg_path.read_text())
        log = args.out / "logs" / f"{mode}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "tunesmith", "train", str(yaml_path)]
        with open(log, "w") as fh:
            try:
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=args.mode_timeout,
                                    cwd=ROOT, env=os.environ.copy(), start_new_session=True).returncode
            except subprocess.TimeoutExpired:
                return {"error": f"timed out after {args.mode_timeout}s (log {log})",
                        "wall_s": time.perf_counter() - t0}
        if rc != 0:
            tail = log.read_text().strip().splitlines()[-3:]
            return {"error": f"exit {rc}: {' | '.join(tail)}", "wall_s": time.perf_counter() - t0}
        summary = json.loads((run_dir / "summary.json").read_text())
    return {"summary": summary, "eval_loss": summary.get("eval_loss"),
            "wall_s": time.perf_counter() - t0}


def compare(results: dict[str, dict], tol: float) -> None:
    """Adds rel_diff / pass to every mode that has a baseline (in place)."""
    for mode, r in results.items():
        base = MODES[mode][0]
        r["baseline"] = base
        if base is None or "eval_loss" not in r or "eval_loss" not in results.get(base, {}):
            continue
        b = results[base]["eval_loss"]
        r["rel_diff"] = (r["eval_loss"] - b) / b
        r["pass"] = abs(r["rel_diff"]) <= tol


def markdown(results: dict[str, dict], args, env: dict[str, str]) -> str:
    lines = [f"Quality guard ({env['date']}, {env['device_name']}, torch {env['torch']}): "
             f"{args.steps} steps (LoRA {max(1, args.steps // 2)}), seq {args.seq}, micro-batch "
             f"{args.micro_batch}, Tiny Shakespeare + WikiText-2 valid -> WikiText-2 test "
             f"(first {args.eval_batches} eval batches"
             f"{f'; first {args.max_chars} characters of each file' if args.max_chars else ''}), "
             f"Llama 3 tokenizer; pass = eval loss "
             f"within {100 * args.tol:g}% of the baseline.", "",
             "| mode | baseline | eval loss | vs baseline | pass | tokens/s | peak GiB | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        if "skipped" in r:
            lines.append(f"| {mode} | {r.get('baseline') or '—'} | skipped: {r['skipped']} | | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {mode} | {r.get('baseline') or '—'} | failed: {r['error'][:120]} | | FAIL | | | |")
            continue
        s = r["summary"]
        diff = f"{100 * r['rel_diff']:+.2f}%" if "rel_diff" in r else "(baseline)"
        ok = {True: "yes", False: "**NO**", None: ""}[r.get("pass")]
        tps = f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else ""
        mem = f"{s['peak_mem_gib']:.1f}" if s.get("peak_mem_gib") else ""
        lines.append(f"| {mode} | {r['baseline'] or '—'} | {r['eval_loss']:.4f} | {diff} | {ok} "
                     f"| {tps} | {mem} | {r['wall_s']:.0f} |")
    lines += ["", "tokens/s are from runs sharing one GPU (--jobs), so they are not speed figures."]
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict[str, str]:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    return {"date": time.strftime("%Y-%m-%d", time.gmtime()), "device_name": name,
            "torch": torch.__version__}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with the device-dependent defaults filled in."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--work", type=Path, default=None,
                   help="runs, tokenised data, the baseline's saved model (~0.7 GB on CUDA); "
                        "default OUT/work")
    p.add_argument("--data", type=Path, default=None,
                   help="shared data folder (default: ./shared/data, else ../shared/data)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--steps", type=int, default=320)
    p.add_argument("--seq", type=int, default=None, help="default: 512 on CUDA, 64 on CPU")
    p.add_argument("--micro-batch", type=int, default=None, help="default: 8 on CUDA, 2 on CPU")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--eval-batches", type=int, default=None, help="default: 64 on CUDA, 2 on CPU")
    p.add_argument("--max-chars", type=int, default=None,
                   help="use the first N characters of each file (default: all on CUDA, 40000 on CPU)")
    p.add_argument("--tol", type=float, default=0.01)
    p.add_argument("--modes", default=",".join(MODES), help="comma list (bf16 always runs)")
    p.add_argument("--jobs", type=int, default=4, help="modes run at once after the baseline")
    p.add_argument("--mode-timeout", type=int, default=240, help="seconds per mode")
    p.add_argument("--in-process", action="store_true",
                   help="call tunesmith.train in this process, one mode after another")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.seq = args.seq or (512 if cuda else 64)
    args.micro_batch = args.micro_batch or (8 if cuda else 2)
    args.eval_batches = args.eval_batches or (64 if cuda else 2)
    args.max_chars = args.max_chars or (None if cuda else 40000)
    args.data = args.data or next((d for d in DATA_DIRS if d.is_dir()), DATA_DIRS[-1])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    missing = [f for f in (*TRAIN_FILES, EVAL_FILE, TOKENIZER) if not (args.data / f).exists()]
    if missing:
        print(f"quality_guard: missing {args.data / missing[0]} (--data: a copy of ../shared/data)",
              file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"quality_guard: unknown mode {unknown[0]!r}; known: {', '.join(MODES)}", file=sys.stderr)
        return 2
    modes = list(dict.fromkeys(["bf16", *modes, *(["lora-bf16"] if "lora-float8" in modes else [])]))
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or args.out / "work"
    results: dict[str, dict] = {m: {} for m in MODES if m in modes}
    for m in results:
        if MODES[m][2] and not cuda:
            results[m] = {"skipped": "needs CUDA"}
    env = environment(args.device)
    # The baseline first, alone: it fills the tokenisation cache and is the LoRA modes' base.
    results["bf16"] = run_mode(args, args.work, "bf16")
    save(results, args, env, quiet=True)
    todo = [m for m in results if m != "bf16" and not results[m]]
    if "error" in results["bf16"]:
        todo = [m for m in todo if m not in LORA]
    jobs = 1 if args.in_process else max(1, args.jobs)
    with ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(run_mode, args, args.work, m): m for m in todo}
        for fut in as_completed(futures):
            m = futures[fut]
            results[m] = fut.result()
            print(f"quality_guard: {m}: {results[m].get('eval_loss', results[m].get('error'))}", flush=True)
            save(results, args, env, quiet=True)  # a time limit from outside leaves what finished
    save(results, args, env, quiet=False)
    return 0


def save(results: dict[str, dict], args, env: dict[str, str], quiet: bool) -> None:
    """result.json + result.md of the modes finished so far (unfinished rows say so)."""
    done = {m: (r if r else {"skipped": "not finished"}) for m, r in results.items()}
    compare(done, args.tol)
    (args.out / "result.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "env": env, "results": done},
        indent=2, default=str))
    md = markdown(done, args, env)
    (args.out / "result.md").write_text(md)
    if not quiet:
        print(md)

if __name__ == "__main__":
    sys.exit(main())
