"""QLoRA on MoE models (NF4 expert stacks) on one CUDA GPU: checks, memory and speed.

    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/moe_qlora_device.py --out $OUT/moe_qlora
    python3 benchmarks/moe_qlora_device.py --memory-table     # CPU: the docs' formula table

Steps run as in benchmarks/moe_device.py (each in its own subprocess under a time limit, one
`RESULT {json}` line each; OUT/moe_qlora_device.json and a markdown summary OUT/moe_qlora_device.md):

  parity          one Qwen3-30B-A3B-shaped sparse layer (E=128, k=8, D=2048, I=768, 8192
                  tokens, r=16 on both expert weights, B random, bf16 autocast): NF4 experts
                  (grouped GEMM, `tunesmith::nf4_experts_linear`) against a layer holding their
                  dequantised bf16 values: output, x's gradient and every lora_A / lora_B
                  gradient; the same with the layer compiled; the per-expert loop against the
                  grouped path; peak memory of forward + backward, NF4 vs bf16 experts
  qwen3_qlora     tokens/s and peak memory of a QLoRA training step on Qwen3-30B-A3B at full
                  depth (48 layers, random weights drawn one block at a time and quantised as
                  they are made), r=16 on q/k/v/o + both expert weights, sequence 2048,
                  micro-batch 2, full activation checkpointing, compiled blocks
  qwen3_lora_bf16 the same model and step with LoRA on a bf16 base (61 GB of weights)
  mixtral_qlora   the QLoRA step on Mixtral-8x7B at full depth (32 layers), if time is left
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from moe_device import (  # noqa: E402
    WARMUP,
    _train,
    _trainer,
    compare_backends,
    json_sections,
    run_cli,
    steps_parser,
)
from moe_lora_device import ALPHA, ATTN, EXPERTS, R, lora_expert_layer, lora_params  # noqa: E402

STEPS = {"parity": 40, "qwen3_qlora": 95, "qwen3_lora_bf16": 60, "mixtral_qlora": 90}
BUDGET_S = 235
SEQ, MICRO_BATCH, SPEED_STEPS = 2048, 2, 7
MODELS = {"qwen3": "qwen3-30b-a3b", "mixtral": "mixtral-8x7b"}


def _nf4_layer_pair():
    """(NF4 layer, dequantised-bf16 reference layer, x, lora params): one Qwen3-30B-A3B sparse
    layer whose experts carry LoRA r=16 (random B); both layers share router and adapters."""
    import copy

    import torch

    from tunesmith.peft.experts import LoRAExperts
    from tunesmith.peft.quant_experts import NF4Experts, quantize_experts

    layer, x = lora_expert_layer()
    ref = copy.copy(layer)  # shares router and adapters
    ref._modules = dict(layer._modules)
    nf4 = quantize_experts(layer.experts)  # QLoRAExperts: NF4 [E*out, in], same adapters
    dense = NF4Experts.to_experts(nf4)  # its dequantised values, bf16 [E, out, in]
    plain = LoRAExperts.__new__(LoRAExperts)
    torch.nn.Module.__init__(plain)
    plain.w13, plain.w2, plain.spec, plain.shapes, plain.lora = dense.w13, dense.w2, nf4.spec, nf4.shapes, nf4.lora
    layer.experts, ref._modules["experts"] = nf4, plain
    return layer, ref, x, lora_params(nf4)


def _fwd_bwd(layer, x, params: dict) -> tuple[dict, float]:
    """Output, x's gradient and `params`' gradients (fp32) of one forward + backward, and its
    peak memory above the start (GiB)."""
    import torch

    for p in params.values():
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cuda", torch.bfloat16):
        y = layer(xi)
    y.float().square().mean().backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return {"out": y.detach().float(), "grad_x": xi.grad.float(),
            **{f"grad_{n}": p.grad.float() for n, p in params.items()}}, peak


def _max_rel(a: dict, b: dict) -> dict:
    return {f"{k}_max_rel_diff": ((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-30)).item() for k in a}


def step_parity() -> dict:
    import torch

    from tunesmith.models.moe.model import grouped_mm_available

    layer, ref, x, params = _nf4_layer_pair()
    got, nf4_peak = _fwd_bwd(layer, x, params)
    want, dense_peak = _fwd_bwd(ref, x, params)
    fast = torch.compile(layer)
    _fwd_bwd(fast, x, params)  # compiles
    compiled, compiled_peak = _fwd_bwd(fast, x, params)
    res = {"nf4_vs_dequantised": _max_rel(want, got), "compiled_vs_eager": _max_rel(got, compiled),
           "peak_fwd_bwd_gib_nf4": nf4_peak, "peak_fwd_bwd_gib_nf4_compiled": compiled_peak, "peak_fwd_bwd_gib_dense_bf16": dense_peak,
           "grouped_mm_available": grouped_mm_available(x, layer.experts.w2, layer.experts.weight_shape("w2")),
           "backends_nf4": compare_backends(layer, x, params), "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__}
    return res


def _recipe(method: str) -> dict:
    return {"peft.method": method, "peft.r": R, "peft.alpha": ALPHA, "peft.target_modules": ATTN,
            "peft.target_parameters": EXPERTS, "parallel.activation_checkpointing": "full"}


def step_speed(kind: str, method: str) -> dict:
    import torch

    from tunesmith.peft import quant

    t0 = time.perf_counter()
    tr, model, flops, peak = _trainer(MODELS[kind], {}, True, None, SPEED_STEPS, micro_batch=MICRO_BATCH,
                                      seq=SEQ, extra=_recipe(method))
    build_s = time.perf_counter() - t0
    weights_gib = torch.cuda.memory_allocated() / 2**30
    times, losses = _train(tr, model, SPEED_STEPS, MICRO_BATCH, SEQ)
    step_s = sorted(times[WARMUP:])[len(times[WARMUP:]) // 2]
    tok_s = MICRO_BATCH * SEQ / step_s
    nf4 = sum(p.numel() for p in model.parameters() if quant.is_nf4(p))
    return {"tokens_per_s": tok_s, "median_step_s": step_s, "mfu": tok_s * flops / (peak * 1e12) if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "after_build_gib": weights_gib,
            "build_s": build_s, "losses": losses, "n_layers": model.cfg.n_layers,
            "nf4_params": nf4, "params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}


# ---------------------------------------------------------------------------- memory formula
NF4_BYTES = 0.5 + 1 / 64 + 2 / (64 * 256)  # 4-bit code, int8 scale / 64, bf16 factor / 16,384


def memory_table(r: int = R) -> str:
    """Markdown: bytes by formula of a one-process QLoRA run (NF4 base + bf16 rest + fp32 adapters
    with fp32 grads and AdamW state, 16 bytes each), counted on the meta-device model the
    assembly builds: adapters on q/k/v/o, with and without both expert weights."""
    import torch

    from tunesmith.config import PeftConfig
    from tunesmith.models import build_model, resolve_model_config
    from tunesmith.peft import apply_peft, quant
    from tunesmith.runtime import Runtime

    rt = Runtime(torch.device("cpu"), "bf16", torch.float32, torch.bfloat16)
    rows = ["| model | experts trained | NF4 base | bf16 (embed, head, norms, router) | adapters r=16 "
            "+ grads + AdamW | total | largest dense expert stack (transient) | bf16 LoRA base |",
            "|---|---|---|---|---|---|---|---|"]
    gb = 1e9
    for name in MODELS.values():
        for experts in (True, False):
            family, cfg = resolve_model_config(name)
            model = build_model(family, cfg, "meta")
            pc = PeftConfig(method="qlora", r=r, alpha=2 * r, target_modules=ATTN,
                            target_parameters=EXPERTS if experts else [])
            apply_peft(model, pc, rt, family, cfg, on_meta=True)
            nf4 = sum(p.numel() for p in model.parameters() if quant.is_nf4(p))
            train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            dense = sum(p.numel() for p in model.parameters()) - nf4 - train
            e, d, i = cfg.num_experts, cfg.dim, cfg.moe_intermediate_size
            total = nf4 * NF4_BYTES + 2 * dense + 16 * train
            rows.append(f"| {name} | {'w13 + w2' if experts else 'no (q/k/v/o only)'} | "
                        f"{nf4 * NF4_BYTES / gb:.1f} GB | {2 * dense / gb:.2f} GB | {16 * train / gb:.2f} GB "
                        f"({train / 1e6:.0f}M) | **{total / gb:.1f} GB** | {2 * e * 2 * i * d / gb:.2f} GB "
                        f"(w13 [{e}, {2 * i}, {d}]) | {2 * (nf4 + dense) / gb:.1f} GB |")
    return "\n".join(rows) + "\n"


def _markdown(results: dict) -> str:
    lines = json_sections("QLoRA on MoE experts on CUDA", results)
    lines += [f"Full depth, seq {SEQ}, micro-batch {MICRO_BATCH}, full AC, compiled blocks, r={R} on q/k/v/o "
              "+ experts", "", "| run | tokens/s | peak GiB | after build GiB |", "|---|---|---|---|"]
    for name in ("qwen3_qlora", "qwen3_lora_bf16", "mixtral_qlora"):
        if name not in results:  # left out by --only
            continue
        r = results[name]
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['peak_mem_gib']:.1f} | {r['after_build_gib']:.1f} |"
                     if "tokens_per_s" in r else f"| {name} | failed: {str(r.get('error', ''))[-80:]!r} | | |")
    return "\n".join(lines + [""])


def child(name: str) -> dict:
    return {"parity": step_parity, "qwen3_qlora": lambda: step_speed("qwen3", "qlora"),
            "qwen3_lora_bf16": lambda: step_speed("qwen3", "lora"),
            "mixtral_qlora": lambda: step_speed("mixtral", "qlora")}[name]()


def main() -> None:
    ap = steps_parser("moe_qlora")
    ap.add_argument("--memory-table", action="store_true", help="print the formula table (CPU) and exit")
    args = ap.parse_args()
    if args.memory_table:
        print(memory_table())
        return
    run_cli(args, __file__, "moe_qlora_device", STEPS, BUDGET_S, child, _markdown)


if __name__ == "__main__":
    main()
