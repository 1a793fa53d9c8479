"""Batched greedy generation: tunesmith (static KV cache, eager and CUDA-graph decode steps) vs
transformers `generate`, same model, same left-padded prompts, same max_new_tokens.

    PYTHONPATH=src python3 benchmarks/bench_generate.py --out $OUT/bench_generate.json
    PYTHONPATH=src python3 benchmarks/bench_generate.py --device cpu --shape tiny --new 16   # smoke

The model is a randomly initialised base of `--shape` (default: the Llama-3.2-1B shape; no
hub access needed), loaded into transformers from tunesmith's state dict, so both hold the
same weights. Prompts: `--batch` rows of uniform random ids with lengths spread over
[--min-len, --max-len], left-padded (HF: attention_mask, ours: attention_mask). EOS is
disabled, so every row generates exactly `--new` tokens.

Per dtype (fp32 first: the equality check; then bf16: the speed that evaluation runs at),
each variant runs once to warm up, then `--repeats` timed runs (median reported):
  hf            transformers generate (SDPA, its default dynamic cache), do_sample=False
  ours-eager    tunesmith.models.generate.generate(..., cuda_graph=False)
  ours-graph    the same with each decode step replayed from a captured CUDA graph (the
                capture is inside every call, so its cost is included)
Reports tokens/s (batch x new tokens / wall time of the whole call, prefill included) and how
many rows' tokens equal HF's exactly. In fp32 they must all be equal (exit code 1 otherwise);
bf16 kernels round differently, so a random model's near-tied logits may diverge there.
Runs in well under 3 minutes on one H200.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from tunesmith.models import build_model, get_family, init_random, resolve_model_config  # noqa: E402
from tunesmith.models.generate import generate, left_pad  # noqa: E402


def build_pair(shape: str, device: str, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, hf) holding the same random fp32 weights."""
    import transformers

    family, cfg = resolve_model_config(shape, {"eos_token_id": None, "bos_token_id": None})
    ours = init_random(build_model(family, cfg, "meta"), device, torch.float32, seed).eval()
    hf_cfg = cfg.to_hf()
    hf_cfg = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(
            hf_cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    state = get_family(cfg.model_type).adapter(cfg).to_hf(ours.state_dict())
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise SystemExit(f"weights do not map: missing {missing}, unexpected {unexpected}")
    hf.generation_config.eos_token_id = None
    return ours, hf


def prompts(batch: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.linspace(lo, hi, batch).round().long().tolist()
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lens]


def timed(fn, device: str, repeats: int) -> tuple[torch.Tensor, float]:
    fn()  # warm-up (lazy init, kernels, allocator)
    times, out = [], None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def run_dtype(ours, hf, ids, mask, new: int, dtype: torch.dtype, device: str, repeats: int):
    ours.to(dtype)
    hf.to(dtype)
    t = ids.shape[1]
    variants = {
        "hf": lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, pad_token_id=0)[:, t:],
        "ours-eager": lambda: generate(ours, ids, new, attention_mask=mask, cuda_graph=False)[:, t:],
    }
    if device == "cuda":
        variants["ours-graph"] = lambda: generate(ours, ids, new, attention_mask=mask,
                                                  cuda_graph=True)[:, t:]
    rows, ref = {}, None
    for name, fn in variants.items():
        with torch.inference_mode():
            out, sec = timed(fn, device, repeats)
        ref = out if ref is None else ref
        same = sum(a.tolist() == b.tolist() for a, b in zip(out, ref, strict=True))
        rows[name] = {"seconds": sec, "tokens_per_s": ids.shape[0] * new / sec,
                      "rows_equal_to_hf": same, "rows": ids.shape[0]}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3.2-1b", help="a tunesmith preset")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--new", type=int, default=128, help="max_new_tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    import transformers

    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the equality check
        torch.backends.cudnn.allow_tf32 = False
    ours, hf = build_pair(args.shape, args.device, args.seed)
    ps = prompts(args.batch, ours.cfg.vocab_size, args.min_len, args.max_len, args.seed)
    ids, mask = left_pad(ps, pad_id=0, device=args.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    result = {
        "shape": args.shape, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "batch": args.batch, "prompt_lens": [len(p) for p in ps], "new_tokens": args.new,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "results": {},
    }
    for name in args.dtypes.split(","):
        result["results"][name] = run_dtype(ours, hf, ids, mask, args.new, dtypes[name],
                                            args.device, args.repeats)
    print(f"{args.shape}, batch {args.batch}, prompts {args.min_len}-{args.max_len} tokens, "
          f"{args.new} new tokens, {result['device']}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print("| dtype | variant | seconds | tokens/s | rows equal to HF |\n|---|---|---|---|---|")
    for dt, rows in result["results"].items():
        for name, r in rows.items():
            print(f"| {dt} | {name} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
                  f"{r['rows_equal_to_hf']}/{r['rows']} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    fp32 = result["results"].get("fp32", {})
    ok = all(r["rows_equal_to_hf"] == r["rows"] for r in fp32.values())
    if not ok:
        print("FAIL: fp32 greedy outputs differ from transformers")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
