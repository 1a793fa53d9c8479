"""float8 MoE experts (train.float8 on Mixtral / Qwen3-MoE) on one Hopper GPU: numerics and speed.

    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/moe_float8_device.py --out $OUT/moe_f8

Steps as in benchmarks/moe_device.py (each in its own subprocess under a time limit, one
`RESULT {json}` line each; OUT/moe_float8_device.json and OUT/moe_float8_device.md):

  kernel        one Qwen3-30B-A3B-shaped sparse layer (E=128, k=8, D=2048, I=768, 8192 tokens):
                the experts' grouped GEMMs in bf16 vs float8 (`Float8Experts`: rowwise scales,
                row blocks padded to 16), bf16 weights and fp32 weights under bf16 autocast:
                relative error (Frobenius) of the output and of the gradients of x, w13, w2
                against bf16, and forward + backward times
  speed_*       tokens/s and peak memory of the training step (compiled blocks, fused loss, fused
                AdamW, fp32 master weights + bf16 autocast) on Qwen3-30B-A3B cut to 4 layers,
                sequence 2048, micro-batch 4: bf16; float8 (tensorwise linears, float8 experts);
                float8 linears only (`float8_skip: [output, "*.experts"]`); losses on the same
                synthetic batches side by side
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from moe_device import (
    SHAPES,
    SPEED_STEPS,
    _expert_layer,
    _speed,
    _train,
    _trainer,
    run_steps,
)

# The float8 grouped GEMM's Triton kernels autotune on their first call per shape: ~40 s each
# of the two expert shapes (measured on an H200), once per process.
STEPS = {"kernel": 150, "speed_bf16": 75, "speed_float8": 200, "speed_float8_linears": 75}
BUDGET_S = 520
VARIANTS = {  # speed step -> recipe keys on top of the bf16 default
    "speed_bf16": {},
    "speed_float8": {"train.float8": "tensorwise"},
    "speed_float8_linears": {"train.float8": "tensorwise", "train.float8_skip": ["output", "*.experts"]},
}


def _fwd_bwd(layer, x, params: dict, autocast: bool, reps: int = 5) -> tuple[dict, float]:
    import torch

    times = []
    for _ in range(reps):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            y = layer(xi)
        y.float().square().mean().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"out": y.detach().float(), "grad_x": xi.grad.float(),
           **{f"grad_{n}": p.grad.float() for n, p in params.items()}}
    return out, 1000 * sorted(times[1:])[len(times[1:]) // 2]


def step_kernel() -> dict:
    import torch

    from tunesmith.models.moe.model import Experts
    from tunesmith.transforms.float8_experts import Float8Experts

    layer, x, available = _expert_layer()  # bf16 weights, x [2, 4096, 2048] bf16
    results = {"grouped_mm_available": available}
    for weights in ("bf16", "fp32_autocast"):
        if weights == "fp32_autocast":
            layer = layer.float()
        e = layer.experts
        params = {"w13": e.w13, "w2": e.w2}
        runs = {}
        for cls in (Experts, Float8Experts):
            e.__class__ = cls
            runs[cls.__name__], results[f"{weights}_{cls.__name__}_fwd_bwd_ms"] = _fwd_bwd(
                layer, x, params, autocast=weights == "fp32_autocast")
        e.__class__ = Experts
        for name, ref in runs["Experts"].items():
            got = runs["Float8Experts"][name]
            results[f"{weights}_{name}_rel_err"] = ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()
            results[f"{weights}_{name}_finite"] = bool(torch.isfinite(got).all())
    return results


def step_speed(name: str) -> dict:
    import torch

    shape, overrides = SHAPES["qwen3"]
    tr, model, flops, peak = _trainer(shape, overrides, True, None, SPEED_STEPS, extra=VARIANTS[name])
    from tunesmith.transforms.float8_experts import Float8Experts

    n_f8 = sum(isinstance(m, Float8Experts) for m in model.modules())
    times, losses = _train(tr, model, SPEED_STEPS, 4, 2048)
    return {**_speed(times, flops, peak), "losses": losses, "float8_expert_layers": n_f8,
            "recipe": VARIANTS[name], "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}


def _markdown(results: dict) -> str:
    lines = ["# float8 MoE experts on CUDA", "", "## kernel", "", "```json",
             json.dumps(results.get("kernel", {}), indent=1), "```", "",
             "Qwen3-30B-A3B, 4 layers, seq 2048, micro-batch 4 (MFU on the bf16 peak)", "",
             "| run | tokens/s | MFU | peak GiB | float8 expert layers | first losses |", "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        r = results.get(name, {})
        if "tokens_per_s" in r:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.1f} | "
                         f"{r['float8_expert_layers']} | {', '.join(f'{v:.4f}' for v in r['losses'][:4])} |")
        else:
            lines.append(f"| {name} | error: {str(r.get('error', 'not run'))[-300:]} | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("moe_f8_out"))
    ap.add_argument("--child")
    ap.add_argument("--only", nargs="*", help="run these steps only")
    args = ap.parse_args()
    if args.child:
        res = step_kernel() if args.child == "kernel" else step_speed(args.child)
        print("RESULT " + json.dumps(res))
        return
    results = run_steps(__file__, STEPS, BUDGET_S, args.out / "moe_float8_device.json", args.only)
    (args.out / "moe_float8_device.md").write_text(_markdown(results))


if __name__ == "__main__":
    main()
