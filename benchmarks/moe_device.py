"""The MoE family on one CUDA GPU (bf16): what the CPU tests cannot check, and its speed.

    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/moe_device.py --out $OUT/moe

Each step runs in its own subprocess under a time limit (a failure is recorded, the rest go
on) and prints one `RESULT {json}` line; everything lands in OUT/moe_device.json and a
markdown summary OUT/moe_device.md. Steps:

  parity      tiny Mixtral / Qwen3-MoE (transformers, saved in the hub layout) loaded by
              tunesmith on CUDA: fp32 logits (per-expert loop) and the aux loss against
              transformers; bf16 (grouped GEMM) error against the fp32 logits, ours beside
              transformers' own; greedy generation (CUDA-graph decode) against HF generate
  kernels     one Qwen3-30B-A3B-shaped expert layer (E=128, k=8, D=2048, I=768, 8192 tokens,
              bf16): grouped GEMM vs the per-expert loop, outputs and gradients, and their times
  compile     a small MoE trained by tunesmith's Trainer with compiled blocks, the fused loss
              and the aux loss: first losses against eager, loss falls, aux logged
  speed_*     tokens/s and peak memory of a training step, tunesmith (precision bf16: fp32
              weights + bf16 autocast, compiled blocks, fused loss, fused AdamW) vs transformers
              eager (bf16 weights, so its default grouped_mm experts path runs, bf16 autocast,
              SDPA, fused AdamW), on Qwen3-30B-A3B with 4 layers and Mixtral-8x7B with 2 layers
              (full width), sequence 2048, micro-batch 4, synthetic tokens
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

STEPS = {  # name -> time limit (s); the whole script stops starting steps at BUDGET_S
    "parity": 45, "kernels": 30, "speed_qwen3_tunesmith": 70, "speed_qwen3_hf": 35,
    "compile": 50, "speed_mixtral_tunesmith": 60, "speed_mixtral_hf": 35,
}
BUDGET_S = 225
SHAPES = {"qwen3": ("qwen3-30b-a3b", {"n_layers": 4}), "mixtral": ("mixtral-8x7b", {"n_layers": 2})}
SEQ, MICRO_BATCH, SPEED_STEPS, WARMUP = 2048, 4, 8, 3


def _hf_tiny(kind: str, path: Path):
    import torch
    import transformers

    common = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2)
    else:
        cfg = transformers.Qwen3MoeConfig(**common, head_dim=32, num_experts=16, num_experts_per_tok=4,
                                          moe_intermediate_size=64, norm_topk_prob=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return model


def step_parity(_args) -> dict:
    out = {}
    for kind in ("mixtral", "qwen3_moe"):
        try:
            out[kind] = _parity_one(kind)
        except Exception as e:  # noqa: BLE001 - recorded per model type; the other still runs
            out[kind] = {"error": repr(e)[:1000]}
    return out


def _parity_one(kind: str) -> dict:
    import tempfile

    import torch

    from tunesmith.models import build_model, load_pretrained, resolve_model_config
    from tunesmith.models.generate import generate

    path = Path(tempfile.mkdtemp()) / kind
    hf = _hf_tiny(kind, path).cuda().eval()
    family, cfg = resolve_model_config(str(path))
    ours = load_pretrained(build_model(family, cfg), str(path), "cuda", torch.float32).eval()
    ours.keep_router_stats()
    ids = torch.randint(1, 256, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True)
        fp32 = (ours(ids) - ref.logits).abs().max().item()
        aux = abs(ours.router_aux_loss().item() - ref.aux_loss.item())
        ref32 = ref.logits.float()
        prompt = ids[:, :8]
        want32 = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    got32 = generate(ours, prompt, max_new_tokens=24, eos_token_id=None)  # loop: eager decode
    with torch.no_grad():
        hf16, ours16 = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
        a, b = hf16(ids).logits.float(), ours16(ids).float()
        want = hf16.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    try:  # CUDA-graph decode through the grouped GEMM (bf16 rounding may flip a pick)
        greedy = (generate(ours16, prompt, max_new_tokens=24, eos_token_id=None) == want).float().mean().item()
    except Exception as e:  # noqa: BLE001 - recorded; the logits numbers still count
        greedy = f"error: {e!r}"[:500]
    return {"fp32_max_abs_logit_diff": fp32, "aux_loss_abs_diff": aux,
            # bf16 against the fp32 logits, ours and transformers' alike (a token whose
            # top-k flips under bf16 rounding changes a lot, in either implementation)
            "bf16_mean_abs_err_ours": (b - ref32).abs().mean().item(),
            "bf16_mean_abs_err_hf": (a - ref32).abs().mean().item(),
            "bf16_argmax_agree_fp32_ours": (b.argmax(-1) == ref32.argmax(-1)).float().mean().item(),
            "bf16_argmax_agree_fp32_hf": (a.argmax(-1) == ref32.argmax(-1)).float().mean().item(),
            "greedy_fp32_equal_hf": bool((got32 == want32).all()),
            "greedy_bf16_graph_agree_hf": greedy,
            "bf16_graph_decode": ours16.graph_safe_decode(),
            "hf_experts_implementation": getattr(hf.config, "_experts_implementation", None)}


def _expert_layer():
    import torch

    from tunesmith.models.moe.config import preset
    from tunesmith.models.moe.model import SparseMoE, grouped_mm_available

    cfg = preset("qwen3-30b-a3b")
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = SparseMoE(cfg).to(torch.bfloat16)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.02)
        layer.experts.w13.normal_(0, 0.02)
        layer.experts.w2.normal_(0, 0.02)
    x = torch.randn(2, 4096, cfg.dim, device="cuda", dtype=torch.bfloat16)
    return layer, x, grouped_mm_available(x, layer.experts.w2)


def step_kernels(_args) -> dict:
    layer, x, available = _expert_layer()
    e = layer.experts
    return {**compare_backends(layer, x, {"w13": e.w13, "w2": e.w2, "router": layer.router.weight}),
            "grouped_mm_available": available}


def compare_backends(layer, x, params: dict) -> dict:
    """The layer's forward + backward on x under the per-expert loop and the grouped GEMM:
    median times and the max relative difference of the output, x's gradient and the
    gradients of `params` {name: Parameter}."""
    import torch

    from tunesmith.models.moe import model as moe

    results, grads = {}, {}
    for backend in ("loop", "grouped"):
        moe.set_expert_backend(backend)
        times = []
        for _ in range(5):
            layer.zero_grad()
            xi = x.clone().requires_grad_(True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = layer(xi)
            y.float().square().mean().backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        grads[backend] = {"out": y.detach().float(), "grad_x": xi.grad.float(),
                          **{f"grad_{n}": p.grad.float() for n, p in params.items()}}
        results[f"{backend}_fwd_bwd_ms"] = 1000 * sorted(times[1:])[len(times[1:]) // 2]
    moe.set_expert_backend("auto")
    for name, a in grads["loop"].items():
        b = grads["grouped"][name]
        results[f"{name}_max_rel_diff"] = ((a - b).abs().max() / a.abs().max().clamp(min=1e-30)).item()
    return results


def _trainer(shape: str, overrides: dict, compile_blocks: bool, aux: float | None, steps: int,
             micro_batch: int = MICRO_BATCH, seq: int = SEQ, precision: str = "bf16",
             extra: dict | None = None):
    """tunesmith's Trainer on a preset cut to `overrides`; `extra`: more recipe keys (e.g. peft)."""
    from bench_clm import build_trainer

    from tunesmith.objective.router_aux import RouterAuxObjective

    args = argparse.Namespace(shape=shape, seq=seq, micro_batch=micro_batch, steps=steps,
                              variant="tunesmith", device="cuda")
    sets = {"model.overrides": overrides, "train.router_aux_loss_coef": aux, "train.precision": precision,
            **(extra or {})}
    tr, model, flops, peak = build_trainer(args, compile_blocks, sets=sets)
    if aux is not None:
        tr.objective = RouterAuxObjective(aux)
    return tr, model, flops, peak


def _train(tr, model, steps: int, micro_batch: int, seq: int) -> tuple[list[float], list[float]]:
    from bench_clm import time_steps

    return time_steps(tr, model.cfg.vocab_size, seq, micro_batch, steps)


def step_compile(_args) -> dict:
    small = {"dim": 512, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "head_dim": 64,
             "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 256,
             "vocab_size": 4096}
    out = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        tr, model, _, _ = _trainer("moe-tiny", small, compiled, 0.01, 30, micro_batch=8, seq=512)
        _, losses = _train(tr, model, 30, 8, 512)
        out[name] = {"losses": losses[:3] + losses[-3:], **tr.objective.log_fields()}
    e, c = out["eager"]["losses"], out["compiled"]["losses"]
    out["first_loss_abs_diff"] = abs(e[0] - c[0])
    out["compiled_loss_fell"] = c[-1] < c[0]
    return out


def _speed(stats_times: list[float], flops: float, peak: float | None) -> dict:
    import torch

    steady = sorted(stats_times[WARMUP:])
    step_s = steady[len(steady) // 2]
    tok_s = MICRO_BATCH * SEQ / step_s
    return {"tokens_per_s": tok_s, "median_step_s": step_s, "mfu": tok_s * flops / (peak * 1e12) if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def step_speed_tunesmith(kind: str, precision: str = "bf16") -> dict:
    """precision: tunesmith's train.precision (bf16: fp32 master weights + autocast; bf16-pure:
    bf16 weights, as transformers' baseline runs)."""
    import torch

    shape, overrides = SHAPES[kind]
    tr, model, flops, peak = _trainer(shape, overrides, True, None, SPEED_STEPS, precision=precision)
    times, losses = _train(tr, model, SPEED_STEPS, MICRO_BATCH, SEQ)
    return {**_speed(times, flops, peak), "losses": losses, "params": sum(p.numel() for p in model.parameters()),
            "flops_per_token": flops, "precision": precision, "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__}


def step_speed_hf(kind: str, wrap=None) -> dict:
    """`wrap`: applied to the transformers model before training (e.g. peft's get_peft_model);
    the optimizer takes the parameters that then require grad."""
    import torch
    import transformers

    from tunesmith.models import build_model, resolve_model_config
    from tunesmith.runtime import peak_tflops

    shape, overrides = SHAPES[kind]
    family, cfg = resolve_model_config(shape, overrides)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    torch.manual_seed(0)
    with torch.device("cuda"):
        # bf16 weights: transformers' grouped_mm experts path needs them (with fp32 weights
        # under autocast it falls back to a per-expert loop); the stronger baseline
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa",
                                                              dtype=torch.bfloat16)
    model = (wrap(model) if wrap is not None else model).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    flops = float(build_model(family, cfg, "meta").flops_per_token(SEQ))
    g = torch.Generator().manual_seed(0)
    times, losses = [], []
    for _ in range(SPEED_STEPS):
        ids = torch.randint(0, cfg.vocab_size, (MICRO_BATCH, SEQ), generator=g).cuda()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {**_speed(times, flops, peak_tflops(torch.device("cuda"))), "losses": losses,
            "experts_implementation": getattr(model.config, "_experts_implementation", None),
            "weights": "bf16",
            "transformers": transformers.__version__}


def child(name: str, precision: str = "bf16") -> dict:
    if name.startswith("speed_"):
        _, kind, who = name.split("_")
        return step_speed_tunesmith(kind, precision) if who == "tunesmith" else step_speed_hf(kind)
    return {"parity": step_parity, "kernels": step_kernels, "compile": step_compile}[name](None)


def _markdown(results: dict) -> str:
    lines = json_sections("MoE on CUDA", results, limit=3000)
    rows = []
    for kind in SHAPES:
        for who in ("tunesmith", "hf"):
            r = results.get(f"speed_{kind}_{who}", {})
            if "tokens_per_s" in r:
                mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
                rows.append(f"| {kind} | {who} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.1f} |")
            else:
                rows.append(f"| {kind} | {who} | failed | | |")
    return "\n".join(lines + ["| shape | run | tokens/s | MFU | peak GiB |", "|---|---|---|---|---|", *rows, ""])


def main() -> None:
    ap = steps_parser("moe")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "bf16-pure"),
                    help="tunesmith's train.precision in the speed steps")
    args = ap.parse_args()
    run_cli(args, __file__, "moe_device", STEPS, BUDGET_S, lambda name: child(name, args.precision),
            _markdown, extra=["--precision", args.precision])


def steps_parser(name: str) -> argparse.ArgumentParser:
    """The arguments every step-driven device script takes: --out, --child (one step, in the
    subprocess run_steps starts), --only."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(f"{name}_out"))
    ap.add_argument("--child")
    ap.add_argument("--only", nargs="*", help="run these steps only")
    return ap


def run_cli(args, script: str, stem: str, steps: dict[str, int], budget_s: float, child_fn,
            markdown_fn, extra: list[str] | None = None) -> None:
    """--child NAME: print that step's `RESULT {json}` line; else run the steps (`run_steps`) and
    write OUT/STEM.json and OUT/STEM.md (`markdown_fn(results)`)."""
    if args.child:
        print("RESULT " + json.dumps(child_fn(args.child)))
        return
    results = run_steps(script, steps, budget_s, args.out / f"{stem}.json", args.only, extra)
    (args.out / f"{stem}.md").write_text(markdown_fn(results))


def json_sections(title: str, results: dict, limit: int = 4000) -> list[str]:
    """Markdown lines: the title, then each step's result as a JSON block (cut at `limit`)."""
    return [f"# {title}", "", *(f"## {name}\n\n```json\n{json.dumps(res, indent=1)[:limit]}\n```\n"
                                for name, res in results.items())]


def run_steps(script: str, steps: dict[str, int], budget_s: float, out_json: Path,
              only: list[str] | None = None, extra: list[str] | None = None) -> dict:
    """Each step `script --child NAME [extra]` in its own subprocess under its time limit (a
    failure is recorded, the rest go on), until `budget_s` is spent; results (each step's
    `RESULT {json}` line) rewritten to `out_json` after every step."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    start = time.perf_counter()
    for name, limit in steps.items():
        if only and name not in only:
            continue
        left = budget_s - (time.perf_counter() - start)
        if left < 15:
            results[name] = {"error": "skipped: the script's time budget was spent"}
            continue
        limit = int(min(limit, left))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, script, "--child", name, *(extra or [])],
                                  capture_output=True, text=True, timeout=limit)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            results[name] = (json.loads(line[-1][7:]) if proc.returncode == 0 and line
                             else {"error": (proc.stderr or proc.stdout)[-3000:]})
        except subprocess.TimeoutExpired:
            results[name] = {"error": f"timed out after {limit} s"}
        results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(results[name])[:400], flush=True)
        out_json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
