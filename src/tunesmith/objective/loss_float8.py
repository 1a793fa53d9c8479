"""The fused loss's three LM-head matmuls in float8 (`linear_cross_entropy(..., float8="tensorwise")`).

Training turns it on through the float8 transform (`transforms.float8.float8_head_recipe`): with
train.float8=tensorwise and the head ('output') not in train.float8_skip. Scaling follows
torchao's tensorwise recipe: one dynamic scale per tensor, e4m3 for the hidden states and the
weight, e5m2 for the gradient, fp32 accumulation in every GEMM (`torch._scaled_mm`):

    once per call   W [V, D] -> W8 e4m3, s_w; W8 also column-major (a copy) for dH
    per group of rows (`group_rows`: at most 2 GiB of float8 gradient on CUDA, 16384 rows at
    V = 128256; the whole micro-batch of the 1B benchmark):
                    H [n, D] -> H8 e4m3 [n16, D], s_h (zero rows pad n to a multiple of 16)
      per chunk     logits [c, V] = H8_c W8^T                      (compute dtype, fast accum)
                    loss, G8 [c, V] e5m2 = kernel(logits)           G = softmax - onehot
                    dH_c [c, D] = G8 W8                             (compute dtype)
                    G8^T -> the group's columns of GT8 [V, n16]
                    dW [V, D] fp32 (+)= GT8 H8                      one GEMM over the group's rows

G's scale is static, 2^15: |softmax - onehot| <= 1, so amax <= 1 is known without a reduction
pass over the [c, V] block, and a power of two scales exactly (e5m2 rounds G * 2^15 as it would
round G; only values below 2^-31 flush to zero, where dynamic scaling would keep them below
amax * 2^-31). dW is not summed chunk by chunk as in bf16, because `_scaled_mm` cannot add
into an existing output: that would cost an fp32 [V, D] temporary and an add pass per chunk,
while one GEMM over the group's rows writes the fp32 accumulator directly (G8 is kept in both
layouts: V-major for dH, token-major for dW, as float8 GEMMs reduce over the contiguous dim).

`_scaled_mm` wants mat1 row-major, mat2 column-major, and V, D multiples of 16; runs on CUDA
GPUs with float8 (compute capability >= 8.9) and, slowly, on CPU (the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.errors import TunesmithError
from tunesmith.transforms.float8 import HEAD_RECIPES

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ALIGN = 16  # the float8 GEMM's rule for every dim it reduces over or lays out column-major
GRAD_SCALE = 2.0**15  # G8 = e5m2(G * 2^15); |G| <= 1 keeps it far below e5m2's max (57344)
_GROUP_BYTES = {"cuda": 2 << 30, "cpu": 64 << 20}


def check_float8_head(recipe: str, vocab: int, dim: int) -> None:
    """One TunesmithError unless the head [vocab, dim] can run `recipe` in the fused loss."""
    if recipe not in HEAD_RECIPES:
        raise TunesmithError(
            f"float8 LM head: recipe {recipe!r} is not supported in the fused loss (only "
            "tensorwise); keep 'output' in train.float8_skip or use train.float8=tensorwise")
    if vocab % ALIGN or dim % ALIGN:
        raise TunesmithError(
            f"float8 LM head: the head is [{vocab}, {dim}]; float8 GEMMs need both dims to be "
            f"multiples of {ALIGN}; keep 'output' in train.float8_skip")


def quantize(t: torch.Tensor, dtype: torch.dtype, col_major: bool = False):
    """t [M, K] -> (t8 [M, K] in `dtype`, t8 stored column-major or None, 0-dim fp32 scale) with
    t ~= t8 * scale: the tensor's amax maps to the format's largest value (tensorwise dynamic
    scaling). `col_major`: also the copy `_scaled_mm` wants as mat2 where K is the reduced dim;
    compiled (CUDA), one tiled kernel writes both layouts instead of a byte-strided transpose."""
    fmax = torch.finfo(dtype).max
    scale = t.abs().amax().float().clamp(min=1e-12) / fmax
    t8 = (t.float() / scale).clamp(-fmax, fmax).to(dtype)
    return t8, t8.t().contiguous().t() if col_major else None, scale


def group_rows(vocab: int, chunk: int, device: torch.device) -> int:
    """Rows whose float8 gradient GT8 [V, rows] one dW GEMM covers: a whole number of chunks."""
    budget = _GROUP_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // max(vocab, 1) // chunk) * chunk


def float8_chunks(hidden, weight, labels, chunk_size, grad_h, grad_w, kernels, compute_dtype,
                  quantize_fn=quantize) -> torch.Tensor:
    """Loss sum over all rows; fills grad_h [N, D] and grad_w [V, D] (fp32) when given.

    hidden [N, D], weight [V, D] (any float dtype: quantised here, once), labels [N].
    kernels: (grad_fn, loss_fn) on logits [c, V]; grad_fn(logits, y, E5M2, GRAD_SCALE) returns
    (loss, G8 [c, V], G8^T [V, c]). quantize_fn: `quantize`, compiled on CUDA by the caller.
    """
    # W8 [V, D] row-major: W8^T is the column-major mat2 of the logits GEMM; dH needs W8 itself
    # column-major.
    w8, w8_cm, s_w = quantize_fn(weight, E4M3, grad_h is not None)
    g_scale = torch.full((), 1.0 / GRAD_SCALE, dtype=torch.float32, device=hidden.device)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    rows = group_rows(weight.size(0), chunk_size, hidden.device)
    mats = (w8, w8_cm, s_w, g_scale)
    for start in range(0, hidden.size(0), rows):
        stop = min(start + rows, hidden.size(0))
        total += _group(hidden[start:stop], labels[start:stop], mats, chunk_size, kernels,
                        compute_dtype, quantize_fn,
                        grad_h[start:stop] if grad_h is not None else None,
                        grad_w, first=start == 0)
    return total


def _group(hidden, labels, mats, chunk_size, kernels, compute_dtype, quantize_fn, grad_h,
           grad_w, first: bool) -> torch.Tensor:
    """One group of n rows: forward, loss, dH per chunk; then one dW GEMM over the n rows."""
    w8, w8_cm, s_w, g_scale = mats
    grad_fn, loss_fn = kernels
    n, n16 = hidden.size(0), -(-hidden.size(0) // ALIGN) * ALIGN
    if n16 > n:  # zero pad rows: they reach only dW, where their gradient columns are zero too
        hidden = F.pad(hidden, (0, 0, 0, n16 - n))
    h8, h8_cm, s_h = quantize_fn(hidden, E4M3, grad_w is not None)  # [n16, D]
    gt8 = None
    if grad_w is not None:
        gt8 = torch.empty(w8.size(0), n16, dtype=E5M2, device=hidden.device)  # [V, n16]
        if n16 > n:  # the pad tokens contribute nothing to dW (zeroed as bytes: +0.0 in e5m2)
            gt8[:, n:].view(torch.uint8).zero_()
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        logits = torch._scaled_mm(h8[start:stop], w8.t(), scale_a=s_h, scale_b=s_w,
                                  out_dtype=compute_dtype, use_fast_accum=True)  # [c, V]
        y = labels[start:stop]
        if grad_h is None and grad_w is None:
            total += loss_fn(logits, y)
            continue
        loss, g8, g8_t = grad_fn(logits, y, E5M2, GRAD_SCALE)  # [c, V], [V, c]
        total += loss
        del logits
        if grad_h is not None:
            grad_h[start:stop] = torch._scaled_mm(g8, w8_cm, scale_a=g_scale, scale_b=s_w,
                                                  out_dtype=compute_dtype)  # [c, D]
        if gt8 is not None:
            _put_columns(gt8, g8_t, start)
        del g8, g8_t
    if gt8 is not None:
        _weight_grad(grad_w, gt8, h8_cm, g_scale, s_h, first)
    return total


def _put_columns(gt8: torch.Tensor, g8_t: torch.Tensor, start: int) -> None:
    """gt8[:, start:start + c] = g8_t [V, c]: a strided copy of V rows of c bytes. Copied as
    8-byte words where both ends align (8x fewer elements for the copy kernel; bytes unchanged)."""
    c = g8_t.size(1)
    if start % 8 == 0 and c % 8 == 0:  # gt8's row length n16 is a multiple of 16
        gt8.view(torch.int64)[:, start // 8 : (start + c) // 8] = g8_t.view(torch.int64)
    else:
        gt8[:, start : start + c] = g8_t


def _weight_grad(grad_w, gt8, h8_cm, g_scale, s_h, first: bool) -> None:
    """grad_w [V, D] (=, or += after the first group) GT8 [V, n16] @ H8 [n16, D], fp32 out."""
    if first and grad_w.dtype == torch.float32:
        torch._scaled_mm(gt8, h8_cm, scale_a=g_scale, scale_b=s_h, out_dtype=torch.float32,
                         out=grad_w)
        return
    dw = torch._scaled_mm(gt8, h8_cm, scale_a=g_scale, scale_b=s_h, out_dtype=torch.float32)
    if first:
        grad_w.copy_(dw)
    else:
        grad_w += dw
