"""FSDP2 training throughput and scaling: Llama-3-8B shape, seq 4096, bf16, 1/2/4 GPUs.

    python benchmarks/bench_fsdp.py --gpus 1,2,4 --json fsdp.json --md fsdp.md

One command: for each GPU count the script starts itself under torchrun
(`python -m torch.distributed.run --standalone --nproc-per-node N bench_fsdp.py --worker ...`).
Each worker builds the model on the meta device, applies tunesmith's own `parallelize` (FSDP2
full_shard per block + root, bf16 compute on fp32 master weights, fp32 gradient reduction,
per-block torch.compile, optional activation checkpointing) and times the production
`Trainer.train_step` (global target count all-reduce, fused chunked linear-cross-entropy on the
FSDP-gathered head, DTensor grad-norm clipping, fused AdamW) on synthetic uniform-random token
batches (different per data-parallel rank). One GPU is the plain (unsharded) model.

Reported per GPU count: tokens/s per GPU (median step after --warmup steps), MFU (tokens/s/GPU x
(6*N_matmul + 12*L*H*d_head*T) / bf16 dense peak), peak memory (max over ranks, allocated and
reserved), and weak-scaling efficiency = tokens/s/GPU at N / tokens/s/GPU at the smallest N that
ran. Memory note: fp32 weights + grads + AdamW states take 16 bytes/param (8B: ~128 GB), so the
full 8B does not fit one 141 GB H200 with activations; the 1-GPU row then reports OOM and the
efficiency baseline is the smallest count that ran (or use --n-layers 16 for a 1/2/4 curve).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _variants import sync  # noqa: E402  (benchmarks/ is on sys.path as the script dir)


# ----------------------------------------------------------------------------- worker
def _run_config(args):
    from tunesmith.config.schema import RunConfig

    return RunConfig.model_validate({
        "model": {"name": args.shape,
                  "overrides": {"n_layers": args.n_layers} if args.n_layers else {}},
        "data": {"path": "synthetic", "block_size": args.seq},
        "train": {"device": args.device, "micro_batch_size": args.micro_batch, "precision": "bf16",
                  "compile": not args.no_compile, "max_grad_norm": 1.0, "float8": args.float8,
                  "float8_all_gather": args.float8_all_gather,
                  **({"float8_skip": []} if args.float8_head else {})},
        "optim": {"lr": 1e-4, "weight_decay": 0.1},
        "schedule": {"name": "constant"},
        "parallel": {"strategy": args.strategy, "activation_checkpointing": args.ac,
                     "tp": args.tp, "ep": args.ep, "timeout_s": 600},
    })


def _batches(vocab: int, seq: int, micro_batch: int, n: int, seed: int, pin: bool):
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro_batch, seq), generator=g)  # [B, T]
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        if pin:  # async host->GPU copies, as a DataLoader with pin_memory gives
            ids, labels = ids.pin_memory(), labels.pin_memory()
        yield {"input_ids": ids, "labels": labels}


def _build(args):
    """The model as `tunesmith train` assembles it (tunesmith.build: meta -> parallelize ->
    materialize -> optimizer), driven by the production Trainer.train_step."""
    import torch

    from tunesmith.build import assemble
    from tunesmith.optim import build_scheduler
    from tunesmith.runtime import peak_tflops
    from tunesmith.train.trainer import Trainer

    cfg = _run_config(args)
    a = assemble(cfg, with_tokenizer=False)
    ctx, rt, model, opt = a.need("ctx"), a.need("rt"), a.need("model"), a.need("optimizer")
    mcfg = a.need("spec").model_cfg
    sched = build_scheduler(opt, cfg.schedule, args.steps, args.steps)
    flops = float(model.flops_per_token(args.seq))
    trainer = Trainer(cfg=cfg, rt=rt, model=model, optimizer=opt, scheduler=sched, train_loader=None,
                      val_loader=None, out_dir=Path("."), total_steps=args.steps,
                      steps_per_epoch=args.steps, flops_per_token=flops,
                      peak_tflops=peak_tflops(rt.device), par=ctx)
    n_params = sum(p.numel() for p in model.parameters())  # DTensor numel: global
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return trainer, ctx, mcfg, flops, n_params


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
    trainer, ctx, mcfg, flops, n_params = _build(args)
    times, losses = [], []
    try:
        for batch in _batches(mcfg.vocab_size, args.seq, args.micro_batch, args.steps,
                              seed=ctx.dp_rank, pin=args.device == "cuda"):
            sync(args.device)
            t0 = time.perf_counter()
            loss, _, _, _ = trainer.train_step([batch])
            sync(args.device)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    except torch.cuda.OutOfMemoryError:
        print("RESULT " + json.dumps({"error": "OOM", "rank": ctx.rank}), flush=True)
        raise
    cuda = args.device == "cuda"
    mem = torch.tensor([torch.cuda.max_memory_allocated() if cuda else 0.0,
                        torch.cuda.max_memory_reserved() if cuda else 0.0],
                       dtype=torch.float64, device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    if ctx.is_main:
        print("RESULT " + json.dumps(_result(args, ctx, times, losses, flops, n_params, mem.tolist())), flush=True)
    if ctx.distributed:
        dist.destroy_process_group()


def _result(args, ctx, times, losses, flops, n_params, mem) -> dict:
    import torch

    from tunesmith.runtime import peak_tflops

    steady = times[args.warmup:]
    step_s = sorted(steady)[len(steady) // 2]  # median: robust to a stray slow step
    per_gpu = args.micro_batch * args.seq * ctx.dp_size / step_s / ctx.world_size
    peak = peak_tflops(torch.device(args.device))
    return {
        "gpus": ctx.world_size, "layout": ctx.layout.describe(),
        "tokens_per_s_per_gpu": per_gpu, "tokens_per_s": per_gpu * ctx.world_size,
        "mfu": per_gpu * flops / (peak * 1e12) if peak else None,
        "peak_mem_alloc_gib": mem[0] / 2**30, "peak_mem_reserved_gib": mem[1] / 2**30,
        "median_step_s": step_s, "mean_step_s": sum(steady) / len(steady),
        "params": n_params, "flops_per_token": flops, "first_losses": losses[:3],
        "last_loss": losses[-1], "torch": torch.__version__,
        "sdpa": os.environ.get("TUNESMITH_SDPA", "auto"),  # kernel preference (auto: cuDNN on sm_90)
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    }


# ----------------------------------------------------------------------------- driver
def _worker_cmd(args, n: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           __file__, "--worker", "--shape", args.shape, "--seq", str(args.seq),
           "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--ac", args.ac, "--strategy", args.strategy, "--tp", str(args.tp),
           "--ep", str(args.ep)]
    if args.n_layers:
        cmd += ["--n-layers", str(args.n_layers)]
    if args.float8 != "none":
        cmd += ["--float8", args.float8, *(["--float8-all-gather"] if args.float8_all_gather else []),
                *(["--float8-head"] if args.float8_head else [])]
    if args.no_compile:
        cmd.append("--no-compile")
    if args.device != "cuda":
        cmd += ["--device", args.device]
    return cmd


def _launch(args, n: int) -> dict:
    env = {**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(_worker_cmd(args, n), capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    results = [json.loads(ln[7:]) for ln in lines]
    ok = [r for r in results if "error" not in r]
    if proc.returncode == 0 and ok:
        return ok[0]
    oom = any(r.get("error") == "OOM" for r in results) or "OutOfMemoryError" in proc.stderr
    return {"gpus": n, "error": "OOM" if oom else "failed", "log_tail": proc.stderr[-3000:]}


def _table(args, rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    base = ok[0]["tokens_per_s_per_gpu"] if ok else None
    head = (f"shape `{args.shape}`{f' ({args.n_layers} layers)' if args.n_layers else ''}, "
            f"seq {args.seq}, micro-batch {args.micro_batch}/GPU, bf16 (fp32 master), "
            f"{'' if args.float8 == 'none' else f'float8 {args.float8} (MFU on the bf16 peak), '}"
            f"{args.strategy}, AC {args.ac}, {'eager' if args.no_compile else 'per-block compile'}; "
            f"median of steps {args.warmup + 1}-{args.steps}")
    out = [head, "", "| GPUs | tokens/s/GPU | tokens/s | MFU | peak alloc (GiB) | peak reserved (GiB) "
           "| step (s) | scaling eff. |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['gpus']} | {r['error']} | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        eff = f"{100 * r['tokens_per_s_per_gpu'] / base:.1f}%"
        out.append(f"| {r['gpus']} | {r['tokens_per_s_per_gpu']:,.0f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                   f"{r['peak_mem_alloc_gib']:.1f} | {r['peak_mem_reserved_gib']:.1f} | "
                   f"{r['median_step_s']:.3f} | {eff} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default="1,2,4", help="GPU counts to run, e.g. 1,2,4")
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--n-layers", type=int, default=None, help="override the layer count")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ac", default="none", choices=["none", "full", "selective"])
    p.add_argument("--strategy", default="full_shard",
                   choices=["full_shard", "shard_grad_op", "hybrid_shard", "no_shard"])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1, help="parallel.ep (MoE shapes)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--float8", default="none", choices=["none", "tensorwise", "rowwise", "rowwise_with_gw_hp"],
                   help="train.float8 (MFU stays on the bf16 peak)")
    p.add_argument("--float8-all-gather", action="store_true", help="train.float8_all_gather (tensorwise)")
    p.add_argument("--float8-head", action="store_true", help="the LM head in float8 too (float8_skip=[])")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke test only
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for n in [int(x) for x in args.gpus.split(",")]:
        print(f"running on {n} GPU(s) ...", file=sys.stderr, flush=True)
        rows.append(_launch(args, n))
        if "error" in rows[-1]:
            print(f"{n} GPU(s): {rows[-1]['error']}\n{rows[-1]['log_tail'][-1500:]}", file=sys.stderr)
    table = _table(args, rows)
    print(table)
    if args.md:
        Path(args.md).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
