"""Gemma 3 on one CUDA GPU: what the CPU tests cannot check (bf16, FlexAttention's sliding-window
block masks, compiled blocks, CUDA-graph decoding) and the training speed against HF Trainer.

    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/gemma_device.py --out $OUT/gemma

Steps, each in its own process under its own time limit (a failure or hang costs only its step):
  parity    a random gemma3-1b-shaped model (8 layers, sequences of 1536 > window 512) vs
            transformers' Gemma3ForCausalLM from the same saved weights: fp32 logits (ours run
            the flex block mask on CUDA, HF its SDPA mask); bf16 weights and fp32 weights under
            bf16 autocast, each side's error against the fp32 reference; packed documents vs
            each document alone (flex documents + window mask).
  generate  greedy decoding with the static KV cache replayed as a CUDA graph, prompts shorter
            and longer than the window, left-padded batch: tokens vs HF `generate`.
  speed     benchmarks/bench_clm.py --shape gemma3-1b --seq 2048: tunesmith (compiled blocks,
            fused chunked loss), tunesmith-eager and hf-trainer (bf16 autocast, SDPA, fused
            AdamW) on the same synthetic batches; the compiled and eager losses are compared.
Writes OUT/parity.json, generate.json, clm.json and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TINY = {"vocab_size": 512, "sliding_window": 16}  # gemma3-tiny: window 16, layers S F S F
ONE_B = {"n_layers": 8}  # gemma3-1b widths (window 512, 262k vocab); 8 layers: S S S S S F S S


DEV = "cuda"  # --device cpu: a smoke run of the parity and generate steps (tiny model only)


def _save_random(preset: str, overrides: dict, out: Path, seed: int = 0) -> Path:
    """A seeded random model in HF format (bf16 files, so every side loads the same values).
    Norm weights are drawn around 0 (Gemma scales by 1 + w) so every norm matters."""
    import torch

    from tunesmith.models import build_model, init_random, resolve_model_config, save_pretrained

    family, cfg = resolve_model_config(preset, overrides)
    model = init_random(build_model(family, cfg, "meta"), DEV, torch.float32, seed)
    with torch.no_grad():
        g = torch.Generator(device=DEV).manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3, generator=g)
    return save_pretrained(model, family, cfg, out, dtype=torch.bfloat16)


def _load_pair(path: Path, dtype):
    import torch
    import transformers

    from tunesmith.models import build_model, load_pretrained, resolve_model_config

    family, cfg = resolve_model_config(str(path))
    ours = load_pretrained(build_model(family, cfg), str(path), DEV, dtype).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return ours, hf.to(DEV).eval(), cfg


def _diff(a, b) -> dict:
    d = (a.float() - b.float()).abs()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item()}


def step_parity(out: Path) -> dict:
    import torch

    from tunesmith.models.attention import AttnSpec

    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        # CUDA: the 1b shape (the tiny one is the CPU tests' and the generate step's); each new
        # shape and dtype compiles flex again, which is what the time limit pays for.
        shapes = (("tiny", "gemma3-tiny", TINY, 100), ("1b_shape", "gemma3-1b", ONE_B, 1536))
        for name, preset, ov, t in shapes[:1] if DEV == "cpu" else shapes[1:]:
            path = _save_random(preset, ov, Path(tmp) / name)
            ids = torch.randint(3, 500, (2, t), generator=torch.Generator().manual_seed(0)).to(DEV)
            r: dict = {"seq": t}
            with torch.no_grad():
                ours, hf, cfg = _load_pair(path, torch.float32)
                r["window"] = cfg.sliding_window
                ref = hf(ids).logits
                r["fp32_ours_vs_hf"] = _diff(ours(ids), ref)
                with torch.autocast(DEV, torch.bfloat16):  # training's numerics
                    r["autocast_ours_vs_fp32"] = _diff(ours(ids), ref)
                    r["autocast_hf_vs_fp32"] = _diff(hf(ids).logits, ref)
                cut = t // 3  # packed: two documents a row, both longer than the tiny window
                doc = (torch.arange(t, device=DEV) >= cut).long().expand(2, t)
                packed = ours(ids, attn=AttnSpec.documents(doc))
                alone = torch.cat([ours(ids[:, :cut]), ours(ids[:, cut:])], dim=1)
                r["packed_vs_alone_fp32"] = _diff(packed, alone)
                del ours, hf
                ours, hf, _ = _load_pair(path, torch.bfloat16)
                r["bf16_ours_vs_fp32"] = _diff(ours(ids), ref)
                r["bf16_hf_vs_fp32"] = _diff(hf(ids).logits, ref)
                del ours, hf
            if DEV == "cuda":
                torch.cuda.empty_cache()
            # Stated bars: fp32 agrees to 2e-3 (max) on logits of O(10); in bf16 our error
            # against the fp32 reference is at most 1.5x HF's own, + 0.05 (max).
            r["pass"] = (r["fp32_ours_vs_hf"]["max_abs"] < 2e-3
                         and r["packed_vs_alone_fp32"]["max_abs"] < 2e-3
                         and all(r[f"{k}_ours_vs_fp32"]["max_abs"]
                                 <= 1.5 * r[f"{k}_hf_vs_fp32"]["max_abs"] + 0.05
                                 for k in ("autocast", "bf16")))
            res[name] = r
    return res


def _until_eos(tokens, eos: int) -> list[int]:
    """The generated tokens up to and including the first eos (what follows is padding)."""
    t = tokens.tolist()
    return t[:t.index(eos) + 1] if eos in t else t


def step_generate(out: Path) -> dict:
    import torch

    from tunesmith.models.generate import generate, left_pad

    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = _save_random("gemma3-tiny", {**TINY, "tie_word_embeddings": False}, Path(tmp) / "g")
        ours, hf, cfg = _load_pair(path, torch.float32)
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 30, 12)]
        new, eos = 40, cfg.eos_token_id  # every row decodes past the window (16)
        alone = []
        for p in prompts:
            ids = torch.tensor([p], device=DEV)
            t0 = time.perf_counter()
            ours_tok = _until_eos(generate(ours, ids, new, cuda_graph=True, eos_token_id=eos)[0, len(p):], eos)
            dt = time.perf_counter() - t0
            hf_tok = _until_eos(hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                            do_sample=False, pad_token_id=0, eos_token_id=eos)[0, len(p):], eos)
            alone.append(ours_tok)
            res[f"prompt_{len(p)}"] = {"equal": ours_tok == hf_tok, "ours": ours_tok, "hf": hf_tok,
                                       "ours_s": dt}
        ids, mask = left_pad(prompts, pad_id=0, device=DEV)
        batch = [_until_eos(row, eos) for row in generate(
            ours, ids, new, attention_mask=mask, cuda_graph=True, eos_token_id=eos)[:, ids.shape[1]:]]
        res["left_padded_batch_equals_alone"] = batch == alone
        res["pass"] = res["left_padded_batch_equals_alone"] and all(
            v["equal"] for k, v in res.items() if k.startswith("prompt_"))
    return res


def step_speed(out: Path, steps: int, micro_batch: int) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_clm.py"), "--shape", "gemma3-1b",
           "--seq", "2048", "--micro-batch", str(micro_batch), "--steps", str(steps), "--warmup", "4",
           "--variants", "tunesmith,hf-trainer,tunesmith-eager", "--json", str(out / "clm.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    rows = json.loads((out / "clm.json").read_text())["results"]
    comp, eager = rows.get("tunesmith", {}), rows.get("tunesmith-eager", {})
    if comp.get("losses") and eager.get("losses"):  # same init, same batches: same training
        rows["compiled_vs_eager_max_loss_diff"] = max(
            abs(a - b) for a, b in zip(comp["losses"], eager["losses"], strict=True))
    return rows


# Time limits (s): the whole script stays under 4 minutes even when a step hangs. bench_clm
# writes clm.json after each variant, so a cut-off speed step keeps the variants that finished
# (eager last: the least needed).
STEPS = {"parity": (step_parity, 70), "generate": (step_generate, 40), "speed": (step_speed, 130)}


def child(args) -> None:
    global DEV
    DEV = args.device
    out = Path(args.out)
    fn = STEPS[args.step][0]
    res = fn(out, args.steps, args.micro_batch) if args.step == "speed" else fn(out)
    (out / f"{'clm_summary' if args.step == 'speed' else args.step}.json").write_text(
        json.dumps(res, indent=2))
    print("RESULT", json.dumps(res)[:2000], flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--only", default="parity,generate,speed")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--step", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.step:
        return child(args)
    import torch
    import transformers

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    lines = [f"# Gemma 3 on {gpu} (torch {torch.__version__}, "
             f"transformers {transformers.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", ""]
    for name in args.only.split(","):
        limit = STEPS[name][1]
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--step", name,
                                   "--steps", str(args.steps), "--micro-batch", str(args.micro_batch),
                                   "--device", args.device],
                                  capture_output=True, text=True, timeout=limit)
            status = f"exit {proc.returncode}"
            tail = (proc.stdout + proc.stderr)[-4000:]
        except subprocess.TimeoutExpired as e:
            status, tail = f"timed out after {limit} s", str(e.stdout or "")[-2000:]
        print(f"== {name}: {status} in {time.time() - t0:.0f} s\n{tail}", flush=True)
        lines += [f"## {name}: {status} ({time.time() - t0:.0f} s)", "", "```", tail[-2500:], "```", ""]
        (out / "summary.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
