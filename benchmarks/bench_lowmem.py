"""Full fine-tuning of a large shape on one GPU with the low-memory optimizers (docs/lowmem.md).

    python benchmarks/bench_lowmem.py --shape llama3-8b --optim adamw8bit --seq 2048 --micro-batch 2 \
        --steps 12 --mem-budget-gib 80 --json out.json

bf16 weights (train.precision=bf16-pure, no fp32 master copy) updated by torchao's 8-/4-bit AdamW
with bf16 stochastic rounding, full activation checkpointing, compiled blocks, randomly
initialised base of the given shape, synthetic token batches (uniform ids, fixed seed), driven
through tunesmith's own Trainer.train_step. `--mem-budget-gib` caps this process's share of
the GPU (torch.cuda.set_per_process_memory_fraction) to emulate a smaller card: an allocation
beyond it fails with an out-of-memory error exactly as it would there.

MFU = tokens/s * (6*N_matmul + 12*L*H*d_head*T) / bf16 peak; activation checkpointing's
recomputation is not counted as useful work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def run(args) -> dict:
    import torch

    from tunesmith.config.schema import RunConfig
    from tunesmith.models import build_model, init_random, resolve_model_config
    from tunesmith.parallel import apply_activation_checkpointing
    from tunesmith.optim import build_optimizer, build_scheduler
    from tunesmith.runtime import peak_tflops, resolve_runtime
    from tunesmith.train.trainer import Trainer

    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    if args.mem_budget_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_budget_gib / total_gib))
    cfg = RunConfig.model_validate({
        "data": {"path": "synthetic", "block_size": args.seq},
        "train": {"micro_batch_size": args.micro_batch, "precision": "bf16-pure", "compile": True,
                  # optim.in_backward applies updates during backward: no global-norm clipping.
                  **({"max_grad_norm": None} if args.in_backward else {})},
        "optim": {"name": args.optim, "lr": 1e-5, "weight_decay": 0.0, "in_backward": args.in_backward},
        "schedule": {"name": "constant"},
        "parallel": {"activation_checkpointing": args.ac},
    })
    rt = resolve_runtime("cuda", "bf16-pure")
    family, mcfg = resolve_model_config(args.shape)
    model = build_model(family, mcfg, device="meta")
    init_random(model, device=rt.device, dtype=rt.param_dtype, seed=0)
    apply_activation_checkpointing(model, args.ac)
    for block in model.layers:
        block.compile()
    opt = build_optimizer(model, cfg.optim, rt.device)
    sched = build_scheduler(opt, cfg.schedule, args.steps, args.steps)
    flops, peak = float(model.flops_per_token(args.seq)), peak_tflops(rt.device)
    tr = Trainer(cfg=cfg, rt=rt, model=model, optimizer=opt, scheduler=sched, train_loader=None,
                 val_loader=None, out_dir=Path("."), total_steps=args.steps, steps_per_epoch=args.steps,
                 flops_per_token=flops, peak_tflops=peak)
    weights_gib = torch.cuda.memory_allocated() / 2**30
    g = torch.Generator().manual_seed(0)
    times, losses = [], []
    for _ in range(args.steps):
        ids = torch.randint(0, mcfg.vocab_size, (args.micro_batch, args.seq), generator=g)  # [B, T]
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _, _, _ = tr.train_step([{"input_ids": ids, "labels": labels}])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    steady = times[args.warmup:] or times
    step_s = sorted(steady)[len(steady) // 2]
    tok_s = args.micro_batch * args.seq / step_s
    state_gib = sum(t.numel() * t.element_size() if type(t) is torch.Tensor else
                    sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in t.__tensor_flatten__()[0])
                    for s in opt.state.values() for t in s.values() if torch.is_tensor(t)) / 2**30
    return {
        "shape": args.shape, "optim": args.optim, "in_backward": args.in_backward, "ac": args.ac,
        "seq": args.seq,
        "micro_batch": args.micro_batch, "mem_budget_gib": args.mem_budget_gib,
        "tokens_per_s": tok_s, "mfu_bf16_peak": tok_s * flops / (peak * 1e12) if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "weights_gib": weights_gib, "optimizer_state_gib": state_gib,
        "median_step_s": step_s, "first_step_s": times[0], "losses": losses,
        "params": sum(p.numel() for p in model.parameters()),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--optim", default="adamw8bit", choices=["adamw8bit", "adamw4bit", "adamw"])
    p.add_argument("--ac", default="full", choices=["none", "full", "selective"])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--mem-budget-gib", type=float, default=None)
    p.add_argument("--in-backward", action="store_true",
                   help="optim.in_backward: step each parameter during backward (no whole-model grads)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
