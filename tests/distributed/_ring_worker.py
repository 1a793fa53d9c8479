"""torchrun worker: ring attention on N ranks against dense attention of the whole sequence.

Each rank holds its two load-balanced chunks of q, k, v (fp64, GQA 4 query / 2 kv heads, rows
with several packed documents and a row with one); the output and the gradients of q, k, v
under a random upstream gradient must equal dense SDPA with the causal-and-same-document mask,
with the default score scale and again with another scale and a sliding window (Gemma 3).
Prints one line per rank with the largest differences; exits 1 when one exceeds 1e-10."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tunesmith.parallel.cp import ContextParallel, ring_attention

B, H, HKV, T, HD = 2, 4, 2, 24, 8


def dense(q, k, v, doc, scale=None, window=None):
    t = q.shape[2]
    pos = torch.arange(t)
    allowed = pos[None, :] <= pos[:, None]  # [T, T]: key <= query
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
    allowed = allowed[None] & (doc[:, :, None] == doc[:, None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True,
                                          scale=scale)


# (scale, window): the default 1/sqrt(hd) and no window; Gemma 3's kind (its own scale, a
# sliding window shorter than a document, so it cuts inside documents and across rank chunks)
CASES = {"plain": (None, None), "scale+window": (0.3, 5)}


def errors(q, k, v, dout, doc, cp, scale, window) -> dict[str, float]:
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    (dense(*full, doc, scale, window) * dout).sum().backward()
    idx = cp.local_index(q.shape[2])
    local = [x[:, :, idx].clone().requires_grad_() for x in (q, k, v)]
    out = ring_attention(*local, index=idx.expand(q.shape[0], -1), doc=doc[:, idx], cp=cp,
                         scale=scale, window=window)
    (out * dout[:, :, idx]).sum().backward()
    errs = {"out": (out - dense(q, k, v, doc, scale, window)[:, :, idx]).abs().max().item()}
    for name, mine, ref in zip(("dq", "dk", "dv"), local, full, strict=True):
        errs[name] = (mine.grad - ref.grad[:, :, idx]).abs().max().item()
    return errs


def main() -> int:
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    q, dout = (torch.randn(B, H, T, HD, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, HKV, T, HD, generator=g, dtype=torch.float64) for _ in range(2))
    doc = torch.tensor([[0] * 5 + [1] * 9 + [2] * 6 + [-1] * 4, [0] * T])  # [B, T]
    cp = ContextParallel(dist.group.WORLD, rank, n)
    worst = 0.0
    parts = []
    for case, (scale, window) in CASES.items():
        errs = errors(q, k, v, dout, doc, cp, scale, window)
        worst = max(worst, *errs.values())
        parts.append(f"{case}: " + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()))
    print(f"rank {rank}/{n}: " + "; ".join(parts), flush=True)
    dist.destroy_process_group()
    return int(worst > 1e-10)


if __name__ == "__main__":
    sys.exit(main())
