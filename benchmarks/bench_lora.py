"""LoRA fine-tuning throughput and memory: tunesmith vs HF transformers + peft, same GPU.

    python benchmarks/bench_lora.py --shape llama3-8b --seq 2048 --micro-batch 4 --steps 30
    python benchmarks/bench_lora.py --shape llama3.2-1b --seq 2048 --micro-batch 8 --steps 30

LoRA r=16 (alpha 32, no dropout) on all linear layers except the LM head, randomly initialised
base of the given shape, identical synthetic token batches (uniform ids, fixed seed), each
variant in its own subprocess (clean allocator, fair peak memory). Variants:

  tunesmith        bf16 frozen base (no fp32 copy), fp32 adapters + AdamW state, bf16 autocast,
                   per-block torch.compile, fused chunked CE, no activation checkpointing
  tunesmith-ac     the same plus per-block activation checkpointing (leanest dense variant)
  tunesmith-qlora  NF4 base (torchao) + fp32 adapters, activation checkpointing, compiled blocks;
                   each NF4 matmul dequantises its weight inside an opaque op, forward and
                   backward, so only the NF4 storage persists (peak = model + AC activations
                   + one dense weight)
  tunesmith-qlora-noac  the same without activation checkpointing
  tunesmith-eager  like `tunesmith` without torch.compile
  tunesmith-float8 like `tunesmith` with the frozen base in float8 e4m3 (peft.base_dtype=float8,
                   fixed per-row scales): base matmuls and their input gradients are float8 GEMMs
  hf-peft          transformers (bf16 weights, SDPA) + peft LoRA (fp32 adapters, peft's
                   default) + HF Trainer (bf16 autocast, fused AdamW) + gradient checkpointing
  hf-peft-nogc     the same without gradient checkpointing
  hf-peft-liger    hf-peft with `use_liger_kernel=True` (Liger's RMSNorm / RoPE / SwiGLU and fused
                   linear cross-entropy; liger-kernel must be installed)
  hf-peft-liger-nogc  the same without gradient checkpointing
  hf-peft-qlora    QLoRA as HF users run it: the base in bitsandbytes NF4 (double quantisation,
                   bf16 compute), peft's `prepare_model_for_kbit_training` (embedding, head and
                   norms in fp32), LoRA, HF Trainer, gradient checkpointing (bitsandbytes must be
                   installed)
  hf-peft-qlora-liger  the same with `use_liger_kernel=True`

Throughput is the median step time after `--warmup` steps. Peak memory is measured from the
end of model setup (so QLoRA's one-off bf16 -> NF4 conversion is not counted; `setup_gib`
reports what the model occupies). Prints a markdown table; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _variants import reset_memory, run_variant, sync  # noqa: E402  (benchmarks/ is on sys.path as the script dir)

VARIANTS = ("tunesmith", "tunesmith-ac", "tunesmith-qlora", "tunesmith-qlora-noac", "tunesmith-eager",
            "tunesmith-float8", "hf-peft", "hf-peft-nogc", "hf-peft-liger",
            "hf-peft-liger-nogc", "hf-peft-qlora", "hf-peft-qlora-liger")
DEFAULT = "tunesmith,tunesmith-ac,tunesmith-qlora,hf-peft"


def synthetic_batches(vocab: int, seq: int, micro_batch: int, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randint(0, vocab, (micro_batch, seq), generator=g)  # [B, T]


def _gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def _tunesmith_model(args, variant: str):
    """The model and optimizer as `tunesmith train` assembles them (tunesmith.build: meta ->
    PEFT -> AC / compile -> materialize -> [NF4] -> adapters -> optimizer); seeded init."""
    from tunesmith.build import assemble
    from tunesmith.config.schema import RunConfig

    compile_blocks = variant != "tunesmith-eager" and not args.no_compile
    cfg = RunConfig.model_validate({
        "model": {"name": args.shape},
        "data": {"path": "synthetic", "block_size": args.seq},
        "train": {"device": args.device, "micro_batch_size": args.micro_batch, "precision": "bf16",
                  "compile": compile_blocks, "seed": 0},
        "optim": {"lr": 1e-4, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "parallel": {"activation_checkpointing":
                     "full" if variant in ("tunesmith-ac", "tunesmith-qlora") else "none"},
        "peft": {"method": "qlora" if variant.startswith("tunesmith-qlora") else "lora", "r": args.r,
                 "alpha": 2 * args.r, "dropout": args.dropout, "target_modules": "all-linear",
                 "base_dtype": "float8" if variant == "tunesmith-float8" else "auto"},
    })
    a = assemble(cfg, with_tokenizer=False)
    return cfg, a.need("rt"), a.need("model"), a.need("optimizer")


def run_tunesmith(args, variant: str) -> dict:
    """Drives tunesmith's own Trainer.train_step (the production step) on synthetic batches."""
    import torch

    from tunesmith.optim import build_scheduler
    from tunesmith.peft import count_params
    from tunesmith.train.trainer import Trainer

    cfg, rt, model, opt = _tunesmith_model(args, variant)
    sched = build_scheduler(opt, cfg.schedule, args.steps, args.steps)
    tr = Trainer(cfg=cfg, rt=rt, model=model, optimizer=opt, scheduler=sched, train_loader=None,
                 val_loader=None, out_dir=Path("."), total_steps=args.steps, steps_per_epoch=args.steps,
                 flops_per_token=1.0, peak_tflops=None)
    setup_gib = reset_memory(args.device)
    times, losses = [], []
    for ids in synthetic_batches(model.cfg.vocab_size, args.seq, args.micro_batch, args.steps):
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # [B, T]
        batch = {"input_ids": ids, "labels": labels}
        sync(args.device)
        t0 = time.perf_counter()
        loss, _, _, _ = tr.train_step([batch])
        sync(args.device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    trainable, total = count_params(model)
    return _result(args, times, losses, trainable, total, setup_gib)


def bnb_4bit(model) -> None:
    """Every nn.Linear but the LM head -> bitsandbytes `Linear4bit` (NF4, double-quantised
    scales, bf16 compute), quantised on the device as `from_pretrained(...,
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))` would load it; the
    base here is random, so it is quantised in place instead of read from a checkpoint."""
    import bitsandbytes as bnb
    import torch

    for parent in list(model.modules()):
        for name, lin in list(parent.named_children()):
            if type(lin) is not torch.nn.Linear or name == "lm_head":
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True,
                                  quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
            if lin.bias is not None:
                q.bias = lin.bias
            setattr(parent, name, q.to(lin.weight.device))  # the move quantises
            del lin


def run_hf_peft(args, gradient_checkpointing: bool, liger: bool = False, qlora: bool = False) -> dict:
    """transformers + peft + HF Trainer on the same shape and data (`liger`: with Liger kernels;
    `qlora`: the base in bitsandbytes NF4, prepared by peft's `prepare_model_for_kbit_training`
    as peft's QLoRA guide does)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from tunesmith.models import resolve_model_config

    _, mcfg = resolve_model_config(args.shape)
    hf_cfg = AutoConfig.for_model(**mcfg.to_hf())
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    if qlora:
        bnb_4bit(model)
        # casts the rest (embedding, head, norms) to fp32, as with a bnb-loaded model
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    # peft keeps adapters in fp32 by default (autocast_adapter_dtype=True): same split as ours.
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    data = [{"input_ids": ids[0], "labels": ids[0]} for ids in
            synthetic_batches(mcfg.vocab_size, args.seq, 1, args.steps * args.micro_batch)]
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(args.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(args.device)
            times.append(time.perf_counter() - self.t0)

    targs = TrainingArguments(
        output_dir="/tmp/hf_lora_bench", per_device_train_batch_size=args.micro_batch,
        max_steps=args.steps, bf16=args.device == "cuda", use_cpu=args.device == "cpu",
        optim="adamw_torch_fused" if args.device == "cuda" else "adamw_torch", learning_rate=1e-4,
        weight_decay=0.0, logging_steps=10**9, save_strategy="no", report_to=[],
        lr_scheduler_type="constant", disable_tqdm=True, gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        use_liger_kernel=liger,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[Timer()])
    setup_gib = reset_memory(args.device)
    trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    res = _result(args, times, [], trainable, total, setup_gib)
    if qlora:  # what the base really is: every block linear a bnb NF4 layer under a LoRA wrapper
        import bitsandbytes as bnb

        res["bnb_nf4_linears"] = sum(isinstance(m, bnb.nn.Linear4bit) and not hasattr(m, "lora_A")
                                     for m in model.modules())
    return res


def _result(args, times, losses, trainable, total, setup_gib) -> dict:
    import torch

    steady = times[args.warmup:] or times
    step_s = sorted(steady)[len(steady) // 2]  # median: robust to a stray slow step
    cuda = args.device == "cuda"
    return {
        "tokens_per_s": args.micro_batch * args.seq / step_s,
        "peak_mem_gib": _gib(torch.cuda.max_memory_allocated()) if cuda else None,
        "setup_gib": setup_gib,
        "median_step_s": step_s,
        "mean_step_s": sum(steady) / len(steady),
        "trainable_params": trainable,
        "total_params": total,
        "first_losses": losses[:3],
        "losses": losses,
        "sdpa": os.environ.get("TUNESMITH_SDPA", "auto"),  # kernel preference (auto: cuDNN on sm_90)
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }


def child(args) -> None:
    if args.variant.startswith("hf-peft"):
        res = run_hf_peft(args, gradient_checkpointing=not args.variant.endswith("-nogc"),
                          liger="liger" in args.variant, qlora="qlora" in args.variant)
    else:
        res = run_tunesmith(args, args.variant)
    print("RESULT " + json.dumps(res), flush=True)


def _table(args, rows: dict) -> None:
    print(f"\n{args.shape}, seq {args.seq}, micro-batch {args.micro_batch}, LoRA r={args.r} all-linear, "
          f"{args.steps} steps ({args.warmup} warm-up)")
    print("| variant | tokens/s | peak mem (GiB) | model after setup (GiB) | median step (s) | trainable |")
    print("|---|---|---|---|---|---|")
    for v, r in rows.items():
        if "error" in r:
            print(f"| {v} | failed | | | | |")
            continue
        peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        setup = f"{r['setup_gib']:.1f}" if r["setup_gib"] is not None else "n/a"
        print(f"| {v} | {r['tokens_per_s']:,.0f} | {peak} | {setup} | {r['median_step_s']:.3f} | "
              f"{r['trainable_params'] / 1e6:.1f}M |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3.2-1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--variants", default=DEFAULT, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test only")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile everywhere")
    p.add_argument("--json", default=None)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)
    rows = {}
    for v in args.variants.split(","):
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        rows[v] = run_variant(__file__, v, [
            "--shape", args.shape, "--seq", str(args.seq), "--micro-batch", str(args.micro_batch),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--r", str(args.r),
            "--dropout", str(args.dropout), "--device", args.device,
            *(["--no-compile"] if args.no_compile else [])])
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    _table(args, rows)


if __name__ == "__main__":
    main()
