"""NF4 dequantisation on CUDA: the Triton kernel (peft/nf4_kernel.py) vs the compiled
expression it replaces, bit equality and speed.

    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/nf4_dequant_device.py --out $OUT/nf4

Shapes: Qwen3-30B-A3B's expert stacks as QLoRA stores them (w13 [128*1536, 2048], w2
[128*2048, 768]), Llama-3-8B's MLP [14336, 4096] and attention [4096, 4096]. Per shape: whether
kernel, compiled expression and torchao's `get_original_weight` agree bit for bit, and the
median ms (CUDA events, 20 after 5 warm-up) of each path with the rate over the bytes that must
move (0.5 B read + 2 B written per element, plus the scales). Writes OUT/nf4_dequant_device.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ce_kernel_device import median_cuda_ms  # noqa: E402  (benchmarks/ is the script's dir)
from tunesmith.peft import nf4_kernel, quant  # noqa: E402

SHAPES = {"qwen3_w13": (128 * 1536, 2048), "qwen3_w2": (128 * 2048, 768),
          "llama8b_mlp": (14336, 4096), "llama8b_attn": (4096, 4096)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    compiled = torch.compile(quant._dequant_flat, dynamic=None,
                             options={"emulate_precision_casts": True})
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, shape in SHAPES.items():
        w = (torch.randn(*shape, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        nf4 = quant.to_nf4(w)
        del w
        parts = quant._nf4_parts(nf4)[:7]
        kern = nf4_kernel.dequant_flat(*parts)
        comp = compiled(*parts)
        orig = nf4.get_original_weight().flatten()
        moved = nf4.numel() * 2.5 + parts[1].numel() + parts[2].numel() * 2
        row = {"shape": list(shape), "kernel_equals_compiled": bool(torch.equal(kern, comp)),
               "kernel_equals_torchao": bool(torch.equal(kern, orig))}
        del kern, comp, orig
        for label, fn in (("kernel", lambda _: nf4_kernel.dequant_flat(*parts)),
                          ("compiled", lambda _: compiled(*parts))):
            ms = median_cuda_ms(fn, reps=20)
            row[f"{label}_ms"] = ms
            row[f"{label}_TB_per_s"] = moved / ms / 1e9
        res["shapes"][name] = row
        print(name, json.dumps(row), flush=True)
        del nf4, parts
    (args.out / "nf4_dequant_device.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
