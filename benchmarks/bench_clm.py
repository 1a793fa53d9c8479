"""Causal-LM training throughput: tunesmith vs HF Trainer, same shape, same data, same GPU.

    python benchmarks/bench_clm.py --shape llama3.2-1b --seq 2048 --micro-batch 8 --steps 40

Variants: tunesmith (compiled blocks), tunesmith-eager, tunesmith-float8 / tunesmith-float8-rowwise
(train.float8=tensorwise / rowwise, default layer rule, compiled), tunesmith-float8-all (tensorwise,
train.float8_filter=all: wk/wv too), tunesmith-float8-head (tensorwise, train.float8_skip=[]: the
LM head in float8 inside the fused loss too), tunesmith-cast-dw (tunesmith with the LM head's
weight gradient summed as before the fp32-in-GEMM change: bf16 chunk product, cast, add; the
A/B of that change), hf-trainer, hf-trainer-liger (the same with
`use_liger_kernel=True`), and any NAME given by `--define NAME:KEY=JSON`: tunesmith with recipe
keys changed, e.g. `--define ib:optim.in_backward=true` or, as two keys of one variant,
`--define 'f8head:train.float8="tensorwise"' --define 'f8head:train.float8_skip=[]'`. MFU always
uses the bf16 peak, float8 variants included.

Each variant runs in its own subprocess (clean allocator, fair peak memory) on identical
synthetic token batches (uniform random ids, fixed seed). Throughput excludes the first
`--warmup` steps (compile, allocator growth). MFU = tokens/s * (6*N_matmul + 12*L*H*d_head*T)
/ peak bf16 dense FLOP/s. Prints a markdown table; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _variants import run_variant  # noqa: E402  (benchmarks/ is on sys.path as the script dir)

VARIANTS = ("tunesmith", "tunesmith-eager", "tunesmith-float8", "tunesmith-float8-rowwise",
            "tunesmith-float8-all", "tunesmith-float8-head", "tunesmith-cast-dw", "hf-trainer",
            "hf-trainer-liger")
FLOAT8 = {"tunesmith-float8": "tensorwise", "tunesmith-float8-rowwise": "rowwise",
          "tunesmith-float8-all": "tensorwise", "tunesmith-float8-head": "tensorwise"}
# Recipe keys a built-in variant sets on top of its float8 recipe.
VARIANT_SETS = {"tunesmith-float8-head": {"train.float8_skip": []}}


def synthetic_batches(vocab: int, seq: int, micro_batch: int, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro_batch, seq), generator=g)
        yield ids


def _flops_and_peak(model, seq):
    from tunesmith.runtime import peak_tflops

    return float(model.flops_per_token(seq)), peak_tflops(next(model.parameters()).device)


def parse_sets(spec: list[str]) -> dict:
    """["train.compile_options={\"coordinate_descent_tuning\": true}", ...] -> {dotted: value};
    each value is JSON (a bare word is a string)."""
    out = {}
    for item in spec:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def build_trainer(args, compile_blocks: bool, float8: str = "none", sets: dict | None = None):
    """tunesmith's own Trainer as `tunesmith train` assembles it, for synthetic batches.

    `sets`: extra recipe keys (dotted, e.g. "optim.in_backward": true) for A/B variants.
    Returns (trainer, model, flops per token, peak TFLOP/s).
    """
    from tunesmith.build import assemble
    from tunesmith.config.resolve import build_config
    from tunesmith.optim import build_scheduler
    from tunesmith.train.trainer import Trainer

    cfg = build_config({
        "model": {"name": args.shape},
        "data": {"path": "synthetic", "block_size": args.seq},
        "train": {"device": getattr(args, "device", "cuda"), "micro_batch_size": args.micro_batch, "precision": "bf16",
                  "compile": compile_blocks, "seed": 0, "float8": float8,
                  "float8_filter": "all" if args.variant.endswith("-all") else "auto"},
        "optim": {"lr": 1e-4, "weight_decay": 0.1},
        "schedule": {"name": "constant"},
    }, **(sets or {}))
    # The model and optimizer as `tunesmith train` assembles them (tunesmith.build): built on
    # meta, float8 layers (train.float8) and compiled blocks by parallelize, materialised with
    # the seeded init, then the optimizer.
    a = assemble(cfg, with_tokenizer=False)
    rt, model, opt = a.need("rt"), a.need("model"), a.need("optimizer")
    sched = build_scheduler(opt, cfg.schedule, args.steps, args.steps)
    flops, peak = _flops_and_peak(model, args.seq)
    tr = Trainer(cfg=cfg, rt=rt, model=model, optimizer=opt, scheduler=sched, train_loader=None,
                 val_loader=None, out_dir=Path("."), total_steps=args.steps, steps_per_epoch=args.steps,
                 flops_per_token=flops, peak_tflops=peak)
    return tr, model, flops, peak


def synthetic_step_batches(vocab: int, seq: int, micro_batch: int, n: int):
    """n pinned {input_ids, labels} batches [micro_batch, seq] (labels shifted, last -100)."""
    import torch

    for ids in synthetic_batches(vocab, seq, micro_batch, n):
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        if torch.cuda.is_available():
            ids, labels = ids.pin_memory(), labels.pin_memory()
        yield {"input_ids": ids, "labels": labels}


def run_tunesmith(args, compile_blocks: bool, float8: str = "none", sets: dict | None = None) -> dict:
    """Drives tunesmith's own Trainer.train_step (the production step) on synthetic batches."""
    tr, model, flops, peak = build_trainer(args, compile_blocks, float8, sets)
    args.micro_batch = tr.cfg.train.micro_batch_size  # a variant may set train.micro_batch_size
    times, losses = time_steps(tr, model.cfg.vocab_size, args.seq, args.micro_batch, args.steps)
    return _result(args, times, flops, peak, losses, sum(p.numel() for p in model.parameters()))


def time_steps(tr, vocab: int, seq: int, micro_batch: int, steps: int) -> tuple[list[float], list[float]]:
    """(seconds, loss) of each `Trainer.train_step` on synthetic batches, GPU-synchronised."""
    import torch

    times, losses = [], []
    for batch in synthetic_step_batches(vocab, seq, micro_batch, steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _, _, _ = tr.train_step([batch])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return times, losses


def run_hf_trainer(args, liger: bool = False) -> dict:
    """HF Trainer on the same shape: bf16 autocast, SDPA, fused AdamW, no grad checkpointing;
    `liger`: with Liger kernels (`use_liger_kernel=True`: fused RMSNorm, RoPE, SwiGLU and
    linear cross-entropy; liger-kernel must be installed)."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from tunesmith.models import build_model, resolve_model_config

    family, mcfg = resolve_model_config(args.shape)
    hf_cfg_dict = mcfg.to_hf()
    from transformers import AutoConfig

    hf_cfg = AutoConfig.for_model(**hf_cfg_dict)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    ref = build_model(family, mcfg, device="meta")
    flops, peak = _flops_and_peak(ref, args.seq)
    data = [{"input_ids": ids[0], "labels": ids[0]} for ids in
            synthetic_batches(mcfg.vocab_size, args.seq, 1, args.steps * args.micro_batch)]

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    targs = TrainingArguments(
        output_dir="/tmp/hf_bench", per_device_train_batch_size=args.micro_batch, max_steps=args.steps,
        bf16=True, optim="adamw_torch_fused", learning_rate=1e-4, weight_decay=0.1, logging_steps=10**9,
        save_strategy="no", report_to=[], dataloader_pin_memory=True, lr_scheduler_type="constant",
        disable_tqdm=True, use_liger_kernel=liger,
    )
    Trainer(model=model, args=targs, train_dataset=data, callbacks=[Timer()]).train()
    return _result(args, times, flops, peak, [], sum(p.numel() for p in model.parameters()))


def _result(args, times, flops, peak, losses, n_params) -> dict:
    import torch

    steady = times[args.warmup:]
    step_s = sorted(steady)[len(steady) // 2]  # median: robust to a stray slow step
    tok_s = args.micro_batch * args.seq / step_s
    return {
        "tokens_per_s": tok_s,
        "mfu": tok_s * flops / (peak * 1e12) if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "median_step_s": step_s,
        "mean_step_s": sum(steady) / len(steady),
        "params": n_params,
        "micro_batch": args.micro_batch,
        "flops_per_token": flops,
        "first_losses": losses[:3],
        "losses": losses,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


def child(args) -> None:
    if args.variant.startswith("hf-trainer"):
        res = run_hf_trainer(args, liger=args.variant == "hf-trainer-liger")
    else:
        if args.variant == "tunesmith-cast-dw":
            import torch

            from tunesmith.objective import loss

            loss._GRAD_W_MODES[loss.grad_w_mode_key("cuda:0", torch.bfloat16)] = "cast"  # the old path
        sets = {**VARIANT_SETS.get(args.variant, {}), **parse_sets(args.set)}
        res = run_tunesmith(args, compile_blocks=args.variant != "tunesmith-eager",
                            float8=FLOAT8.get(args.variant, "none"), sets=sets)
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3.2-1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--variants", default="tunesmith,hf-trainer")
    p.add_argument("--define", action="append", default=[], metavar="NAME:KEY=JSON",
                   help="a variant NAME = tunesmith (compiled) plus recipe key KEY set to JSON; "
                        "repeat for more keys or variants, then list NAME in --variants")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.variant:
        return child(args)
    defined: dict[str, list[str]] = {}
    for d in args.define:
        name, _, kv = d.partition(":")
        defined.setdefault(name, []).extend(["--set", kv])
    rows = {}
    for v in args.variants.split(","):
        if v not in VARIANTS and v not in defined:
            p.error(f"unknown variant {v!r}: one of {', '.join(VARIANTS)} or a --define NAME")
        child_variant = "tunesmith" if v in defined else v
        rows[v] = run_variant(__file__, child_variant, [
            "--shape", args.shape, "--seq", str(args.seq), "--micro-batch", str(args.micro_batch),
            "--steps", str(args.steps), "--warmup", str(args.warmup), *defined.get(v, [])])
        if args.json:  # after every variant: a time limit from outside keeps what finished
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    print(f"\n{args.shape}, seq {args.seq}, micro-batch {args.micro_batch}, {args.steps} steps "
          f"({args.warmup} warm-up)")
    print("| variant | micro-batch | tokens/s | MFU | peak mem (GiB) | median step (s) | last loss |")
    print("|---|---|---|---|---|---|---|")
    for v, r in rows.items():
        if "error" in r:
            print(f"| {v} | | failed | | | | |")
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
            last = f"{r['losses'][-1]:.4f}" if r.get("losses") else "n/a"  # HF: not recorded
            print(f"| {v} | {r.get('micro_batch', args.micro_batch)} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.1f} | {r['median_step_s']:.3f} | {last} |")


if __name__ == "__main__":
    main()
