"""The Triton cross-entropy rows kernel against the compiled expression it replaces, on CUDA.

    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/ce_kernel_device.py --out $OUT/ce

One [4096, 128256] bf16 logits block (Llama 3's vocab at the fused loss's CUDA chunk size),
logits drawn with the spread of a trained head (std 3), 5% of targets ignored:
  parity   loss and gradient of `ce_kernel.chunk_loss_and_grad` vs the inductor-compiled
           `_chunk_loss_and_grad` (the previous path), and both vs an fp64 reference
  timing   ms per block (CUDA events, median of 30 after 5 warm-up), and the bytes the block
           moves (read twice + write once) over that time, for both, and for the loss-only
           kernels (evaluation)
Writes OUT/ce_kernel_device.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tunesmith.objective import ce_kernel  # noqa: E402
from tunesmith.objective.loss import _chunk_loss, _chunk_loss_and_grad  # noqa: E402

ROWS, VOCAB = 4096, 128256


def median_cuda_ms(fn, make_input=lambda: None, reps: int = 30, warm: int = 5) -> float:
    """Median ms of `fn(make_input())` over `reps` runs after `warm`, by CUDA events; the input
    is made outside the timed span (a fresh block each run: the kernels write in place)."""
    times = []
    for i in range(warm + reps):
        x = make_input()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        torch.cuda.synchronize()
        if i >= warm:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(ROWS, VOCAB, device=dev, generator=gen) * 3).to(torch.bfloat16)
    y = torch.randint(0, VOCAB, (ROWS,), device=dev, generator=gen)
    y[torch.rand(ROWS, device=dev, generator=gen) < 0.05] = -100
    inductor_grad = torch.compile(_chunk_loss_and_grad, dynamic=False)
    inductor_loss = torch.compile(_chunk_loss, dynamic=False)

    ref_l, ref_g = _chunk_loss_and_grad(logits.double(), y, torch.float64)  # fp64 reference
    ind_l, ind_g = inductor_grad(logits.clone(), y, torch.bfloat16)
    tri_l, tri_g = ce_kernel.chunk_loss_and_grad(logits.clone(), y)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "shape": [ROWS, VOCAB], "ignored_rows": int((y == -100).sum())}
    res["parity"] = {
        "loss_fp64": float(ref_l), "loss_inductor": float(ind_l), "loss_triton": float(tri_l),
        "grad_max_abs_triton_vs_inductor": float((tri_g.float() - ind_g.float()).abs().max()),
        "grad_max_abs_triton_vs_fp64": float((tri_g.double() - ref_g).abs().max()),
        "grad_max_abs_inductor_vs_fp64": float((ind_g.double() - ref_g).abs().max()),
        "grad_elements_differing": int((tri_g != ind_g).sum()),
        "loss_only_triton": float(ce_kernel.chunk_loss(logits, y)),
        "loss_only_inductor": float(inductor_loss(logits, y)),
    }
    del ref_g, ind_g, tri_g
    block_bytes = logits.numel() * logits.element_size()
    timing = {}
    for name, fn in (("inductor_grad", lambda x: inductor_grad(x, y, torch.bfloat16)),
                     ("triton_grad", lambda x: ce_kernel.chunk_loss_and_grad(x, y)),
                     ("inductor_loss_only", lambda x: inductor_loss(x, y)),
                     ("triton_loss_only", lambda x: ce_kernel.chunk_loss(x, y))):
        ms = median_cuda_ms(fn, logits.clone)
        passes = 3 if name.endswith("grad") else 1
        timing[name] = {"ms": ms, "TB_per_s_at_%d_passes" % passes: passes * block_bytes / ms / 1e9}
    res["timing"] = timing
    (args.out / "ce_kernel_device.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
