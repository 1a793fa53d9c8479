"""LoRA on MoE experts (peft.target_parameters) on one CUDA GPU: checks and speed vs peft.

    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/moe_lora_device.py --out $OUT/moe_lora

Steps run as in benchmarks/moe_device.py (each in its own subprocess under a time limit, one
`RESULT {json}` line each; OUT/moe_lora_device.json and a markdown summary OUT/moe_lora_device.md):

  parity      tiny Mixtral / Qwen3-MoE (transformers, hub layout) with a peft-made adapter on
              q/v and the experts (r=8, and r=3: padded to 8 on the grouped path), loaded by
              tunesmith on CUDA: fp32 logits (per-expert loop) against transformers + peft; bf16
              (grouped GEMM) against those fp32 logits, ours beside peft's own bf16 error; our
              adapter saved and loaded back by this box's peft with equal fp32 logits
  kernels     one Qwen3-30B-A3B-shaped sparse layer (E=128, k=8, D=2048, I=768, 8192 tokens, bf16
              base, fp32 adapters r=16 under bf16 autocast, B random): grouped GEMM vs the loop,
              output and gradients of x and of every lora_A / lora_B, and their times
  speed_*     tokens/s and peak memory of a LoRA training step (attention q/k/v/o + both expert
              weights, r=16, alpha=32) on Qwen3-30B-A3B cut to 4 layers, sequence 2048,
              micro-batch 4: tunesmith (compiled blocks, bf16 frozen base, fp32 adapters,
              autocast) vs transformers + peft (bf16 weights, grouped_mm experts, peft's
              ParamWrapper on gate_up_proj / down_proj, autocast), same process kind, same shapes
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from moe_device import (  # noqa: E402
    MICRO_BATCH,
    SEQ,
    SHAPES,
    SPEED_STEPS,
    _hf_tiny,
    _speed,
    _train,
    _trainer,
    compare_backends,
    json_sections,
    run_cli,
    step_speed_hf,
    steps_parser,
)

STEPS = {"parity": 60, "kernels": 45, "speed_tunesmith": 75, "speed_hf": 60}
BUDGET_S = 225
R, ALPHA = 16, 32
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def step_parity(_args) -> dict:
    out = {}
    for kind in ("mixtral", "qwen3_moe"):
        for r in (8, 3):
            try:
                out[f"{kind}_r{r}"] = _parity_one(kind, r)
            except Exception as e:  # noqa: BLE001 - recorded per case; the others still run
                out[f"{kind}_r{r}"] = {"error": repr(e)[:1000]}
    return out


def _parity_one(kind: str, r: int) -> dict:
    import peft
    import torch
    import transformers

    from tunesmith.models import build_model, load_pretrained, resolve_model_config
    from tunesmith.peft import load_adapter, save_adapter

    tmp = Path(tempfile.mkdtemp())
    _hf_tiny(kind, tmp / "base")
    torch.manual_seed(1)
    theirs = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32),
        peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS,
                        init_lora_weights=False))
    theirs.save_pretrained(tmp / "ad")
    theirs = theirs.cuda().eval()
    family, cfg = resolve_model_config(str(tmp / "base"))
    ours = load_pretrained(build_model(family, cfg), str(tmp / "base"), "cuda", torch.float32)
    load_adapter(ours, family.adapter(cfg), tmp / "ad")
    ours.eval()
    ids = torch.randint(1, 256, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        ref = theirs(ids).logits.float()
        fp32 = (ours(ids) - ref).abs().max().item()
        save_adapter(ours, family.adapter(cfg), tmp / "ours")
        back = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32), tmp / "ours")
        round_trip = (back.cuda().eval()(ids).logits - ref).abs().max().item()
        with torch.autocast("cuda", torch.bfloat16):  # fp32 adapters, bf16 compute: grouped GEMM
            b = ours(ids).float()
        a = theirs.to(torch.bfloat16)(ids).logits.float()
    return {"fp32_max_abs_logit_diff_vs_peft": fp32, "our_adapter_in_peft_max_abs_diff": round_trip,
            "bf16_mean_abs_err_ours": (b - ref).abs().mean().item(),
            "bf16_mean_abs_err_peft": (a - ref).abs().mean().item(),
            "bf16_argmax_agree_fp32_ours": (b.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "bf16_argmax_agree_fp32_peft": (a.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "peft": peft.__version__, "transformers": transformers.__version__}


def lora_expert_layer():
    """(layer, x): one Qwen3-30B-A3B-shaped sparse layer on CUDA (bf16 base, weights N(0, 0.02))
    whose experts carry LoRA r=R on both weights (fp32 adapters, B drawn too so the update is
    not zero), and an input x [2, 4096, D] bf16. Also benchmarks/moe_qlora_device.py's layer."""
    import torch

    from tunesmith.models.moe.config import preset
    from tunesmith.models.moe.model import SparseMoE
    from tunesmith.peft.experts import LoRAExperts
    from tunesmith.peft.lora import LoRASpec

    cfg = preset("qwen3-30b-a3b")
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = SparseMoE(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    layer.experts = LoRAExperts(layer.experts, LoRASpec(r=R, alpha=ALPHA), ("w13", "w2"), torch.float32)
    with torch.no_grad():
        for m in layer.experts.lora.values():
            m.lora_B.normal_(0, 0.02)
    return layer, torch.randn(2, 4096, cfg.dim, device="cuda", dtype=torch.bfloat16)


def lora_params(experts) -> dict:
    """{w13_lora_A: Parameter, ...}: the expert adapters, by the names the reports use."""
    return {f"{n}_{k}": p for n, m in experts.lora.items() for k, p in m.named_parameters()}


def step_kernels(_args) -> dict:
    import torch

    from tunesmith.models.moe.model import grouped_mm_available

    layer, x = lora_expert_layer()
    params = lora_params(layer.experts)
    with torch.autocast("cuda", torch.bfloat16):
        res = compare_backends(layer, x, params)
        res["grouped_mm_available"] = grouped_mm_available(x, layer.experts.w2)
    return res


def _lora_recipe() -> dict:
    return {"peft.method": "lora", "peft.r": R, "peft.alpha": ALPHA, "peft.target_modules": ATTN,
            "peft.target_parameters": EXPERTS}


def step_speed_tunesmith() -> dict:
    import torch

    shape, overrides = SHAPES["qwen3"]  # Qwen3-30B-A3B cut to 4 layers, as moe_device's speed step
    tr, model, flops, peak = _trainer(shape, overrides, True, None, SPEED_STEPS, extra=_lora_recipe())
    times, losses = _train(tr, model, SPEED_STEPS, MICRO_BATCH, SEQ)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**_speed(times, flops, peak), "losses": losses, "trainable_params": trainable,
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}


def step_speed_hf_peft() -> dict:
    import peft

    def wrap(model):
        conf = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=ATTN, target_parameters=EXPERTS)
        return peft.get_peft_model(model, conf)

    res = step_speed_hf("qwen3", wrap=wrap)
    return {**res, "peft": peft.__version__}


def _markdown(results: dict) -> str:
    lines = json_sections("LoRA on MoE experts on CUDA", results)
    rows = []
    for who in ("tunesmith", "hf"):
        r = results.get(f"speed_{who}", {})
        rows.append(f"| {who} | {r['tokens_per_s']:,.0f} | {r['peak_mem_gib']:.1f} |" if "tokens_per_s" in r
                    else f"| {who} | failed | |")
    head = [f"Qwen3-30B-A3B, 4 layers, seq {SEQ}, micro-batch {MICRO_BATCH}, LoRA r={R} on q/k/v/o + experts", "",
            "| run | tokens/s | peak GiB |", "|---|---|---|"]
    return "\n".join(lines + head + rows + [""])


def child(name: str) -> dict:
    return {"parity": lambda: step_parity(None), "kernels": lambda: step_kernels(None),
            "speed_tunesmith": step_speed_tunesmith, "speed_hf": step_speed_hf_peft}[name]()


def main() -> None:
    args = steps_parser("moe_lora").parse_args()
    run_cli(args, __file__, "moe_lora_device", STEPS, BUDGET_S, child, _markdown)


if __name__ == "__main__":
    main()
