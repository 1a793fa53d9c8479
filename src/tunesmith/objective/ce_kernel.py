"""Softmax cross-entropy of one logits block and its gradient in one Triton kernel (CUDA).

The fused loss (`loss.py`) walks the tokens in [c, V] blocks; per block it needs the sum of
token losses and G = softmax(logits) - onehot(y) (zero on ignored rows). The block is bf16 and
large (4096 x 128256 = 1.05 GB), so the work is memory-bound: what counts is how many times the
block crosses HBM. Inductor's kernel for the same expression reads the block twice and writes G
once into a second block: 1.19 ms per [4096, 128256] block on an H200 (2.6 TB/s over those
three passes). Here one program owns one row: an online max / sum-of-exp pass over the row, then
a second pass that writes G over the logits in place (no second [c, V] allocation): 0.94 ms
(3.35 TB/s; benchmarks/RESULTS.md). A row is 256 KB, so part of the second read comes from L2.

Values equal the reference `_chunk_loss_and_grad` up to fp32 summation order: the softmax is
computed in fp32 from the stored logits, G is rounded once to the block's dtype.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds take the eager path in loss.py
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = None

IGNORE_INDEX = -100
_BLOCK = 8192  # columns per iteration: 32 warps x 32 lanes x 8 elements
_WARPS = 32


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _ce_rows(x_ptr, x_stride, y_ptr, loss_ptr, n_cols, grad_scale,
                 IGNORE: tl.constexpr, BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
        """One program per row of x [rows, n_cols]: loss_ptr[row] = lse - x[y] (0 if ignored);
        with WRITE_GRAD, x[row] is overwritten by (softmax - onehot(y)) * grad_scale."""
        row = tl.program_id(0).to(tl.int64)
        x_ptr += row * x_stride
        y = tl.load(y_ptr + row)
        valid = y != IGNORE
        # Pass 1: running max m and sum d of exp(x - m), fp32 (online softmax).
        m = -float("inf")
        d = 0.0
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < n_cols, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        # Targets are in [0, n_cols) or IGNORE (inputs shifted by one, and the embedding rejects
        # ids beyond the vocabulary); the mask only keeps a bad label from reading past the row.
        safe_y = tl.where(valid, y, 0)
        picked = tl.load(x_ptr + safe_y, mask=(safe_y >= 0) & (safe_y < n_cols), other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
        if WRITE_GRAD:
            # Pass 2: G = (exp(x - lse) - [col == y]) * scale; scale is 0 on ignored rows.
            scale = tl.where(valid, grad_scale, 0.0)
            for start in range(0, n_cols, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < n_cols
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(offs == y, 1.0, 0.0)
                tl.store(x_ptr + offs, (g * scale).to(x_ptr.dtype.element_ty), mask=mask)


def _launch(logits: torch.Tensor, y: torch.Tensor, grad_scale: float, write_grad: bool) -> torch.Tensor:
    """Runs the kernel over logits [c, V] (rows contiguous); returns the fp32 loss sum."""
    rows, cols = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _ce_rows[(rows,)](logits, logits.stride(0), y, losses, cols, float(grad_scale),
                          IGNORE=IGNORE_INDEX, BLOCK=_BLOCK, WRITE_GRAD=write_grad, num_warps=_WARPS)
    return losses.sum()


def chunk_loss_and_grad(logits: torch.Tensor, y: torch.Tensor, grad_scale: float = 1.0):
    """logits [c, V] bf16/fp16/fp32, y [c] -> (sum of CE fp32, G [c, V] in logits' dtype).

    G = (softmax - onehot(y)) x grad_scale is written over `logits` (the fused loss's block,
    used once): no second [c, V] allocation. Rows may be strided (a column slice is written in
    place); a block whose columns are not contiguous is copied first."""
    g = logits if logits.stride(-1) == 1 else logits.contiguous()
    return _launch(g, y.contiguous(), grad_scale, write_grad=True), g


def chunk_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of CE over logits [c, V] (read only), fp32."""
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    return _launch(x, y.contiguous(), 1.0, write_grad=False)
