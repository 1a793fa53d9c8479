"""QLoRA at scale: memory per GPU by formula, and a one-layer measurement under FSDP2.

    python3 benchmarks/check_longctx.py qlora-memory --out OUT        # formula table, CPU is fine
    python3 benchmarks/check_longctx.py qlora-layer --gpus 2 --out OUT # GPUs: one block, measured

`qlora-memory` writes OUT/qlora_memory.{json,md}: for the Llama-3-8B and -70B shapes (QLoRA
r=16 on every block linear, NF4 base, bf16 embeddings/head, fp32 adapters with AdamW) the bytes
each GPU holds under FSDP2 full_shard on 1/2/4/8 GPUs, split into the persistent sharded state
and the transient gathered weights; activations are separate (they depend on batch, sequence
and checkpointing).

`qlora-layer` starts itself under torchrun on --gpus GPUs (FSDP2 full_shard, NCCL) and, for
each shape truncated to --n-layers blocks (default 1), builds the model exactly as `tunesmith
train` does (meta -> NF4 + LoRA on meta -> FSDP2 -> shards allocated -> filled), measures the
allocated bytes after building (compared with the formula for that truncated model), then
trains --steps steps on random tokens (bf16, full activation checkpointing, chunked loss) and
reports the peak. Writes OUT/qlora_layer.json. Guarded: each shape runs in its own torchrun
with a timeout, an OOM or failure is recorded and the next shape still runs.
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

GiB = 1024**3
# NF4 bytes per weight element: a 4-bit code, one int8 scale per 64 elements and one fp32
# factor per 64 x 256 elements (torchao's defaults, double quantisation).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
ADAPTER_BYTES = 4 + 4 + 8  # fp32 weight + fp32 grad + AdamW exp_avg and exp_avg_sq
SHAPES = ("llama3-8b", "llama3-70b")


# ----------------------------------------------------------------------------- formula
def linear_shapes(mcfg) -> list[tuple[int, int]]:
    """[out, in] of one block's linear layers (q, k, v, o, gate, up, down)."""
    d, hd = mcfg.dim, mcfg.dim // mcfg.n_heads
    kv, ffn = mcfg.n_kv_heads * hd, mcfg.intermediate_size
    return [(d, d), (kv, d), (kv, d), (d, d), (ffn, d), (ffn, d), (d, ffn)]


def qlora_bytes(mcfg, gpus: int, r: int = 16, prefetch: int = 1) -> dict:
    """Bytes per GPU of QLoRA under FSDP2 full_shard on `gpus` GPUs (1 = one process)."""
    lins = linear_shapes(mcfg)
    block = sum(o * i for o, i in lins)
    lin_total = block * mcfg.n_layers
    embed = mcfg.vocab_size * mcfg.dim
    head = 0 if mcfg.tie_word_embeddings else embed
    norms = mcfg.dim * (2 * mcfg.n_layers + 1)
    adapters = r * sum(o + i for o, i in lins) * mcfg.n_layers
    persistent = {
        "nf4_base": lin_total * NF4_BYTES / gpus,
        "bf16_embed_head_norms": (embed + head + norms) * 2 / gpus,
        "adapters_grads_adamw": adapters * ADAPTER_BYTES / gpus,
    }
    gathered_blocks = min(1 + prefetch, mcfg.n_layers)
    transient = {
        # every block in flight all-gathers its NF4 storage (current + prefetched ones)
        "gathered_nf4_blocks": (gathered_blocks * block * NF4_BYTES) if gpus > 1 else 0.0,
        # one dense bf16 weight exists only inside its matmul (tunesmith::nf4_linear)
        "dense_bf16_weight": max(o * i for o, i in lins) * 2,
        # the root unit (LM head) stays gathered from forward through the loss's backward
        "gathered_head_bf16": (head or embed) * 2 if gpus > 1 else 0.0,
    }
    p, t = sum(persistent.values()), sum(transient.values())
    return {"gpus": gpus, "persistent": persistent, "transient": transient,
            "persistent_gib": p / GiB, "transient_gib": t / GiB, "total_gib": (p + t) / GiB,
            "nf4_params": lin_total, "adapter_params": adapters}


def qlora_memory(args) -> None:
    from tunesmith.models import resolve_model_config

    rows = []
    for shape in SHAPES:
        mcfg = resolve_model_config(shape)[1]
        for g in (1, 2, 4, 8):
            rows.append({"shape": shape, **qlora_bytes(mcfg, g, r=args.r)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qlora_memory.json").write_text(json.dumps(rows, indent=1))
    lines = ["| shape | GPUs | NF4 base | bf16 embed+head | adapters+grads+AdamW | gathered (transient) | total, no activations |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["persistent"]
        lines.append(f"| {r['shape']} | {r['gpus']} | {p['nf4_base'] / GiB:.2f} | "
                     f"{p['bf16_embed_head_norms'] / GiB:.2f} | {p['adapters_grads_adamw'] / GiB:.2f} | "
                     f"{r['transient_gib']:.2f} | {r['total_gib']:.2f} GiB |")
    (out / "qlora_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ----------------------------------------------------------------------------- one layer
def _timed_steps(trainer, vocab_size: int, args, *, seed: int, cuda: bool,
                 reset_peak_at: int) -> tuple[list[float], list[float]]:
    """args.steps training steps on random [1, args.seq] rows; (losses, seconds per step), each
    step timed between device syncs; peak-memory stats reset before step `reset_peak_at`."""
    import torch

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(seed)
    losses, times = [], []
    for step in range(args.steps):
        if step == reset_peak_at and cuda:
            torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, vocab_size, (1, args.seq), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        sync()
        t0 = time.perf_counter()
        loss, *_ = trainer.train_step([{"input_ids": ids, "labels": labels}])
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return losses, times


def _worker(args) -> None:
    import torch
    import torch.distributed as dist

    from tunesmith.build import assemble
    from tunesmith.build.pipeline import optimizer as build_optimizer_step
    from tunesmith.config.schema import RunConfig
    from tunesmith.optim import build_scheduler
    from tunesmith.train.trainer import Trainer

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    cfg = RunConfig.model_validate({
        "model": {"name": args.shape, "overrides": {"n_layers": args.n_layers, **json.loads(args.overrides)}},
        "data": {"path": "synthetic", "block_size": args.seq},
        "train": {"device": args.device, "micro_batch_size": 1, "precision": "bf16", "max_grad_norm": 1.0},
        "optim": {"lr": 1e-4}, "schedule": {"name": "constant"},
        "peft": {"method": "qlora", "r": args.r, "alpha": 2 * args.r},
        "parallel": {"strategy": "full_shard", "activation_checkpointing": "full", "timeout_s": 300},
    })
    cuda = args.device == "cuda"
    # meta -> NF4 + LoRA on meta -> FSDP2 -> shards allocated and quantised -> adapters
    a = assemble(cfg, until="fill_adapters", with_tokenizer=False)
    rt, ctx, model, mcfg = a.need("rt"), a.need("ctx"), a.need("model"), a.need("spec").model_cfg
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    built = torch.cuda.memory_allocated() if cuda else 0
    build_optimizer_step(a)
    opt = a.need("optimizer")
    trainer = Trainer(cfg=cfg, rt=rt, model=model, optimizer=opt,
                      scheduler=build_scheduler(opt, cfg.schedule, args.steps, args.steps),
                      train_loader=None, val_loader=None, out_dir=Path("."), total_steps=args.steps,
                      steps_per_epoch=args.steps, flops_per_token=0.0, peak_tflops=None, par=ctx)
    losses, times = _timed_steps(trainer, mcfg.vocab_size, args, seed=ctx.rank, cuda=cuda,
                                 reset_peak_at=0)
    stats = ([built, torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated(),
              torch.cuda.max_memory_reserved()] if cuda else [0.0] * 4)
    mem = torch.tensor(stats, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    if ctx.is_main:
        f = qlora_bytes(mcfg, ctx.world_size, r=args.r)
        print("RESULT " + json.dumps({
            "shape": args.shape, "n_layers": args.n_layers, "gpus": ctx.world_size, "seq": args.seq,
            "built_gib": mem[0].item() / GiB, "after_steps_gib": mem[1].item() / GiB,
            "peak_allocated_gib": mem[2].item() / GiB, "peak_reserved_gib": mem[3].item() / GiB,
            "formula_persistent_gib": f["persistent_gib"], "formula_transient_gib": f["transient_gib"],
            "losses": losses, "step_s": times,
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if cuda else "cpu"}), flush=True)
    dist.destroy_process_group()


def qlora_layer(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, deadline = [], time.monotonic() + args.budget
    for shape in args.shapes.split(","):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(args.gpus), __file__, "worker", "--shape", shape, "--n-layers", str(args.n_layers),
               "--seq", str(args.seq), "--steps", str(args.steps), "--lora-r", str(args.r),
               "--device", args.device, "--overrides", args.overrides]
        left = int(deadline - time.monotonic())
        results.append(_guarded(cmd, min(args.timeout, left), {"shape": shape}) if left > 10
                       else {"shape": shape, "error": "skipped: time budget spent"})
        print(json.dumps(results[-1])[:2000], flush=True)
        (out / "qlora_layer.json").write_text(json.dumps(results, indent=1))


# ----------------------------------------------------------------------------- offload
OFFLOAD_VARIANTS = {"none": ("none", False), "full_ac": ("full", False),
                    "full_ac+offload": ("full", True), "offload": ("none", True)}


def _offload_worker(args) -> None:
    """One variant on one GPU: the Llama-3-8B shape (--shape) truncated to --n-layers blocks, LoRA r=16 on a
    bf16 base (so activations dominate), compiled blocks, bf16; median step time and peak."""
    import torch

    from tunesmith.build import assemble
    from tunesmith.config.schema import RunConfig
    from tunesmith.optim import build_scheduler
    from tunesmith.train.trainer import Trainer

    ac, offload = OFFLOAD_VARIANTS[args.variant]
    cfg = RunConfig.model_validate({
        "model": {"name": args.shape, "overrides": {"n_layers": args.n_layers, **json.loads(args.overrides)}},
        "data": {"path": "synthetic", "block_size": args.seq},
        "train": {"device": args.device, "micro_batch_size": 1, "precision": "bf16",
                  "compile": not args.no_compile},
        "optim": {"lr": 1e-4}, "schedule": {"name": "constant"},
        "peft": {"method": "lora", "r": 16, "alpha": 32},
        "parallel": {"activation_checkpointing": ac, "activation_offload": offload},
    })
    cuda = args.device == "cuda"
    a = assemble(cfg, with_tokenizer=False)
    rt, model, opt, mcfg = a.need("rt"), a.need("model"), a.need("optimizer"), a.need("spec").model_cfg
    trainer = Trainer(cfg=cfg, rt=rt, model=model, optimizer=opt,
                      scheduler=build_scheduler(opt, cfg.schedule, args.steps, args.steps),
                      train_loader=None, val_loader=None, out_dir=Path("."), total_steps=args.steps,
                      steps_per_epoch=args.steps, flops_per_token=0.0, peak_tflops=None)
    # Peak memory from step 1: after the compile step.
    losses, times = _timed_steps(trainer, mcfg.vocab_size, args, seed=0, cuda=cuda, reset_peak_at=1)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    print("RESULT " + json.dumps({
        "variant": args.variant, "n_layers": args.n_layers, "seq": args.seq,
        "tokens_per_s": args.seq / step_s,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB if cuda else 0.0,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB if cuda else 0.0, "losses": losses,
        "torch": torch.__version__, "device_name": torch.cuda.get_device_name() if cuda else "cpu"}), flush=True)


def offload_table(args) -> None:
    """none / full AC / full AC + offload / offload alone, each in its own process."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, deadline = [], time.monotonic() + args.budget
    for variant in OFFLOAD_VARIANTS:
        cmd = [sys.executable, __file__, "offload-worker", "--variant", variant, "--seq", str(args.seq),
               "--n-layers", str(args.n_layers), "--steps", str(args.steps), "--shape", args.shape,
               "--device", args.device, "--overrides", args.overrides,
               *(["--no-compile"] if args.no_compile else [])]
        left = int(deadline - time.monotonic())
        results.append(_guarded(cmd, min(args.timeout, left), {"variant": variant}) if left > 10
                       else {"variant": variant, "error": "skipped: time budget spent"})
        print(json.dumps(results[-1])[:1500], flush=True)
        (out / "offload.json").write_text(json.dumps(results, indent=1))
    lines = ["| variant | tokens/s | peak allocated | peak reserved |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['peak_allocated_gib']:.1f} GiB | "
              f"{r['peak_reserved_gib']:.1f} GiB |" if "error" not in r else f"| {r['variant']} | {r['error'][-200:]!r} | | |"
              for r in results]
    (out / "offload.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _guarded(cmd: list[str], timeout: int, tag: dict) -> dict:
    """Run one measurement process; its RESULT line, or the error (OOM, timeout, crash)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**tag, "error": f"timeout after {timeout}s"}
    found = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return found[0] if found else {**tag, "error": proc.stderr[-3000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["qlora-memory", "qlora-layer", "offload", "worker", "offload-worker"])
    ap.add_argument("--variant", choices=list(OFFLOAD_VARIANTS), default="none")
    ap.add_argument("--out", default="outputs/longctx")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--shape", default="llama3-70b")
    ap.add_argument("--n-layers", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lora-r", dest="r", type=int, default=16)
    ap.add_argument("--timeout", type=int, default=100, help="seconds per measurement process")
    ap.add_argument("--budget", type=int, default=220, help="seconds for the whole mode")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the same code (gloo)")
    ap.add_argument("--overrides", default="{}", help="model overrides (JSON), e.g. for a CPU smoke run")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="qlora-layer: the shapes to measure")
    args = ap.parse_args()
    if args.mode in ("offload", "offload-worker") and args.shape == "llama3-70b":
        args.shape = "llama3-8b"  # offload defaults: 8 blocks of the 8B shape at 8k
        if args.seq == 4096 and args.n_layers == 1:
            args.seq, args.n_layers = 8192, 8
    {"qlora-memory": qlora_memory, "qlora-layer": qlora_layer, "offload": offload_table,
     "worker": _worker, "offload-worker": _offload_worker}[args.mode](args)


if __name__ == "__main__":
    main()
