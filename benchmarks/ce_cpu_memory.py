"""Host memory and time of the LM-head loss on CPU: plain cross-entropy vs the fused chunked loss.

Each variant runs in a fresh process (peak RSS is per process), one thread, forward + backward of
the loss alone on hidden [N, D] and head [V, D]:

  plain      logits = h @ W^T materialised, F.cross_entropy (what an unfused head does)
  fused_old  the chunked loss with the reference kernel and 4096-row chunks (before 2026-12-01)
  fused      the chunked loss as shipped: in-place CPU kernel, rows from `chunk_rows`

    PYTHONPATH=src python benchmarks/ce_cpu_memory.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {"dim64_llama3_vocab": (2048, 64, 128256), "dim64_gpt2_vocab": (2048, 64, 50257)}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant: str, n: int, d: int, v: int, repeats: int = 3) -> dict:
    import torch
    import torch.nn.functional as F

    from tunesmith.objective import loss as L

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(n, d, generator=gen) * 0.5).requires_grad_()
    w = (torch.randn(v, d, generator=gen) * 0.05).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen)
    y[::7] = L.IGNORE_INDEX
    base = _rss_mib()
    if variant == "fused_old":
        L._kernels = lambda device: (L._chunk_loss_and_grad, L._chunk_loss)

    def step() -> float:
        h.grad = w.grad = None
        if variant == "plain":
            out = F.cross_entropy(h @ w.t(), y, ignore_index=L.IGNORE_INDEX, reduction="sum")
        else:
            out = L.linear_cross_entropy(h, w, y, chunk_size=4096 if variant == "fused_old" else None)
        out.backward()
        return float(out.detach())

    loss = step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "loss": loss, "s_per_step": statistics.median(times),
            "peak_rss_mib": _rss_mib(), "peak_over_inputs_mib": _rss_mib() - base,
            "chunk_rows": L.chunk_rows(v, torch.device("cpu"))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "SHAPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], *SHAPES[args.one[1]])))
        return
    import torch

    rows = []
    for shape, dims in SHAPES.items():
        for variant in ("plain", "fused_old", "fused"):
            out = subprocess.run([sys.executable, __file__, "--one", variant, shape],
                                 capture_output=True, text=True, check=True)
            row = {"shape": shape, "n_d_v": dims, **json.loads(out.stdout)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"torch": torch.__version__, "threads": 1, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
