"""DPO throughput and memory: tunesmith vs TRL's DPOTrainer (+ peft, optionally + Liger), same GPU.

    python benchmarks/bench_dpo.py --shape llama3.2-1b --prompt 512 --answer 512 --pairs 4 --steps 20

LoRA r=16 (alpha 32, no dropout) on all linear layers except the LM head, randomly initialised
bf16 base of the given shape, DPO sigmoid loss with beta 0.1, the reference = the base with the
adapters switched off (both tools' default for a PEFT model). Identical synthetic pairs: a
prompt of `--prompt` uniform token ids, then two answers: the chosen one's length drawn uniformly
from [answer/2, answer], the rejected one's 1.5 answer minus that (so every micro-batch is padded,
as real preference data is, and every step holds the same number of real tokens in any order). Each variant runs
in its own subprocess. Variants:

  tunesmith      tunesmith's Trainer.train_step with the preference objective: compiled blocks,
                 fused AdamW, per-row log-probs through the fused head + CE kernel, no AC
  tunesmith-ac   the same with per-block activation checkpointing
  tunesmith-float8  the same with the frozen base in float8 e4m3 (peft.base_dtype=float8): the
                 reference forward (adapters off) runs the same float8 base
  tunesmith-qlora   NF4 base (QLoRA) with activation checkpointing
  tunesmith-full full fine-tune (fp32 master weights, bf16 autocast), the reference a frozen
                 compiled bf16 copy of the starting weights (saved to a temporary directory first)
  tunesmith-pre, tunesmith-full-pre  LoRA / full fine-tune with dpo.precompute_reference: every
                 pair scored by the reference before the timed steps (its time reported as
                 precompute_s), then no reference forward, and the full fine-tune's copy released
  trl            TRL DPOTrainer (its fused LM-head log-probs) + peft, bf16, fused AdamW, no
                 gradient checkpointing; tokenisation skipped (the same token ids are given)
  trl-liger      the same with `use_liger_kernel=True` (Liger's RMSNorm / SwiGLU / RoPE kernels)
  trl-full, trl-full-liger  full fine-tune in TRL (fp32 weights, bf16 autocast), the reference a
                 frozen bf16 copy as ours, without / with Liger

tokens/s counts the policy's real (unpadded) tokens of both answers and prompts, the same count
for every variant, over all steps after `--warmup` (total tokens / total time); the median
step's rate and every step's time are in the JSON. Prints a markdown table;
--json writes every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _variants import reset_memory, run_variant, sync  # noqa: E402  (benchmarks/ is on sys.path as the script dir)

VARIANTS = ("tunesmith", "tunesmith-ac", "tunesmith-float8", "tunesmith-qlora", "tunesmith-full",
            "tunesmith-pre", "tunesmith-full-pre", "trl",
            "trl-liger", "trl-full", "trl-full-liger")
DEFAULT = "tunesmith,trl,trl-liger"
PAD = 0


def synthetic_pairs(vocab: int, prompt: int, answer: int, n: int, seed: int = 0) -> list[dict]:
    """n pairs of token-id lists {prompt_ids, chosen_ids, rejected_ids} (ids >= 1: 0 pads)."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(1, vocab, (k,), generator=g).tolist()

    pairs = []
    for _ in range(n):
        # chosen in [answer/2, answer], rejected the complement: every pair (so every step, in any
        # order the peer's sampler picks) holds the same number of real tokens, and rows differ.
        c = int(torch.randint(answer // 2, answer + 1, (1,), generator=g))
        pairs.append({"prompt_ids": ids(prompt), "chosen_ids": ids(c), "rejected_ids": ids(3 * answer // 2 - c)})
    return pairs


def real_tokens(pairs: list[dict]) -> int:
    return sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


def _ours_batch(pairs: list[dict], pad_multiple: int | None) -> dict:
    """The pairs through tunesmith's own collator (`tunesmith train` pads to a multiple of 64
    under compile): rows chosen/rejected interleaved, right-padded, labels shifted, -100 on the
    prompt and the padding."""
    from tunesmith.data.preference import PairCollator

    def side(q: list[int], a: list[int]) -> dict:
        return {"input_ids": q + a, "loss_mask": [False] * len(q) + [True] * len(a)}

    return PairCollator(PAD, pad_multiple)([{"chosen": side(p["prompt_ids"], p["chosen_ids"]),
                                             "rejected": side(p["prompt_ids"], p["rejected_ids"])}
                                            for p in pairs])


def run_tunesmith(args, variant: str) -> dict:
    from tunesmith.build import assemble
    from tunesmith.config.schema import RunConfig
    from tunesmith.data.assembly import pad_multiple
    from tunesmith.optim import build_scheduler
    from tunesmith.train.setup import build_objective
    from tunesmith.train.trainer import Trainer

    full = variant in ("tunesmith-full", "tunesmith-full-pre")
    model_name = _saved_shape(args.shape) if full else args.shape  # a full FT's reference needs weights
    cfg = RunConfig.model_validate({
        "task": "dpo", "dpo": {"beta": 0.1},
        "model": {"name": model_name},
        "data": {"path": "synthetic", "block_size": args.prompt + args.answer},
        "train": {"device": args.device, "micro_batch_size": args.pairs, "precision": "bf16",
                  "compile": not args.no_compile, "seed": 0},
        "optim": {"lr": 1e-5, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "parallel": {"activation_checkpointing":
                     "full" if variant in ("tunesmith-ac", "tunesmith-qlora") else "none"},
        "peft": {"method": "none" if full else "qlora" if variant == "tunesmith-qlora" else "lora", "r": args.r,
                 "alpha": 2 * args.r, "target_modules": "all-linear",
                 "base_dtype": "float8" if variant == "tunesmith-float8" else "auto"},
    })
    a = assemble(cfg, with_tokenizer=False)
    model, opt = a.need("model"), a.need("optimizer")
    tr = Trainer(cfg=cfg, rt=a.need("rt"), model=model, optimizer=opt,
                 scheduler=build_scheduler(opt, cfg.schedule, args.steps, args.steps), train_loader=None,
                 val_loader=None, out_dir=Path("."), total_steps=args.steps, steps_per_epoch=args.steps,
                 flops_per_token=1.0, peak_tflops=None, objective=build_objective(cfg, a))
    data = synthetic_pairs(model.cfg.vocab_size, args.prompt, args.answer, args.steps * args.pairs)
    batches = [_ours_batch(data[s * args.pairs:(s + 1) * args.pairs], pad_multiple(cfg))
               for s in range(args.steps)]
    pre_s = None
    if variant.endswith("-pre"):  # as train.setup does it, over this run's batches
        from tunesmith.objective.reference_table import precompute

        rt, objective = a.need("rt"), tr.objective
        table, pre_s = precompute(lambda b: objective.reference_logps(model, b, rt), [batches])
        objective.use_table(table)
    setup_gib = reset_memory(args.device)
    times, losses, tokens = [], [], []
    for s in range(args.steps):
        pairs = data[s * args.pairs:(s + 1) * args.pairs]
        batch = batches[s]
        sync(args.device)
        t0 = time.perf_counter()
        loss, _, _, _ = tr.train_step([batch])
        sync(args.device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        tokens.append(real_tokens(pairs))
    return {**_result(args, times, tokens, losses, setup_gib), "precompute_s": pre_s}


def _saved_shape(shape: str) -> str:
    """The shape's seeded random init saved in HF format (bf16) to a temporary directory."""
    import tempfile

    import torch

    from tunesmith.models import build_model, init_random, resolve_model_config, save_pretrained

    family, cfg = resolve_model_config(shape)
    model = init_random(build_model(family, cfg, "meta"), "cuda" if torch.cuda.is_available() else "cpu",
                        "bfloat16", 0)
    out = Path(tempfile.mkdtemp(prefix="dpo_bench_")) / shape
    save_pretrained(model, family, cfg, out)
    return str(out)


def run_trl(args, liger: bool, full: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tunesmith.models import resolve_model_config

    _, mcfg = resolve_model_config(args.shape)
    torch.manual_seed(0)
    with torch.device("cuda" if args.device == "cuda" else "cpu"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**mcfg.to_hf()), attn_implementation="sdpa",
                                                 dtype=torch.float32 if full else torch.bfloat16)
    # TRL wants a tokenizer for its pad id; the pairs are already token ids, so a stand-in holding
    # only the special tokens is enough (nothing is tokenised).
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1}, "<pad>")),
                                  pad_token="<pad>", eos_token="</s>")

    class Pretokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):  # the same ids as tunesmith's, untouched
            return dataset

    data = synthetic_pairs(mcfg.vocab_size, args.prompt, args.answer, args.steps * args.pairs)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(args.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(args.device)
            times.append(time.perf_counter() - self.t0)

    targs = DPOConfig(
        output_dir="/tmp/trl_dpo_bench", per_device_train_batch_size=args.pairs, max_steps=args.steps,
        bf16=args.device == "cuda", use_cpu=args.device == "cpu", learning_rate=1e-5, weight_decay=0.0,
        optim="adamw_torch_fused" if args.device == "cuda" else "adamw_torch", beta=0.1,
        loss_type=["sigmoid"], max_length=None, logging_steps=10**9, save_strategy="no", report_to=[],
        lr_scheduler_type="constant", disable_tqdm=True, gradient_checkpointing=False,
        use_liger_kernel=liger, dataloader_drop_last=True,
    )
    # Full fine-tune: the reference is a frozen bf16 copy, as tunesmith's (TRL would otherwise load
    # one from the policy's hub path, which a randomly initialised model does not have).
    ref = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False) if full else None
    trainer = Pretokenized(model=model, ref_model=ref, args=targs, train_dataset=Dataset.from_list(data),
                           processing_class=tok,
                           peft_config=None if full else LoraConfig(
                               r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                               target_modules="all-linear", task_type="CAUSAL_LM"),
                           callbacks=[Timer()])
    setup_gib = reset_memory(args.device)
    trainer.train()
    tokens = [real_tokens(data[s * args.pairs:(s + 1) * args.pairs]) for s in range(args.steps)]
    return _result(args, times, tokens, [], setup_gib)


def _result(args, times, tokens, losses, setup_gib) -> dict:
    import torch

    steady = list(zip(times, tokens))[args.warmup:] or list(zip(times, tokens))
    cuda = torch.cuda.is_available() and args.device == "cuda"
    return {
        # Over all timed steps: total real tokens / total time (a slow step counts in full).
        "tokens_per_s": sum(tok for _, tok in steady) / sum(t for t, _ in steady),
        "median_tokens_per_s": sorted(tok / t for t, tok in steady)[len(steady) // 2],
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "setup_gib": setup_gib,
        "median_step_s": sorted(t for t, _ in steady)[len(steady) // 2],
        "step_s": times,
        "first_losses": losses[:3],
        "steps_timed": len(times),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }


def child(args) -> None:
    if args.variant.startswith("trl"):
        res = run_trl(args, liger="liger" in args.variant, full="full" in args.variant)
    else:
        res = run_tunesmith(args, args.variant)
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3.2-1b")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--answer", type=int, default=512)
    p.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch (2x rows)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--variants", default=DEFAULT, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test only")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)
    rows = {v: run_variant(__file__, v, _strip(sys.argv[1:])) for v in args.variants.split(",")}
    print(f"\n{args.shape}, DPO (sigmoid, beta 0.1), LoRA r={args.r} all-linear, {args.pairs} pairs per "
          f"micro-batch, prompt {args.prompt} + answers {args.answer // 2}-{args.answer} tokens, "
          f"{args.steps} steps ({args.warmup} warm-up)")
    print("| variant | tokens/s | peak mem (GiB) | model after setup (GiB) | median step (s) |")
    print("|---|---|---|---|---|")
    for v, r in rows.items():
        if "error" in r:
            print(f"| {v} | failed | | | |")
            continue
        peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        setup = f"{r['setup_gib']:.1f}" if r["setup_gib"] is not None else "n/a"
        print(f"| {v} | {r['tokens_per_s']:,.0f} | {peak} | {setup} | {r['median_step_s']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _strip(argv: list[str]) -> list[str]:
    """argv without --variants/--json and their values (the child gets its own --variant)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--variants", "--json"):
            skip = True
            continue
        if a.startswith(("--variants=", "--json=")):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
