"""NF4 dequantisation in one Triton kernel (CUDA): packed 4-bit codes -> the dense weight.

QLoRA dequantises every frozen weight in forward and again in backward, and once more in the
recomputed forward under activation checkpointing. For MoE experts, whose weights see few
tokens each, that is a large share of the step: Qwen3-30B-A3B dequantises ~87B elements per
step. The compiled expression of `quant._dequant_flat` ran at 1.0-1.4 TB/s on an H200 for the
expert stacks; this kernel, at 2.3-2.6 TB/s (benchmarks/RESULTS.md), reads each byte once,
computes each 64-weight block's scale once, looks both codes up in the 16-entry table and writes
the two outputs side by side.

Bit for bit equal to `quant._dequant_flat` (and so to torchao's `get_original_weight`): every
intermediate is rounded to the table's dtype (bf16) where eager rounds it, and the scale's
division is IEEE-rounded (`div_rn`), as eager's is.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; elsewhere quant.py keeps its own paths
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

_BLOCKS = 64  # quantisation blocks per program: 64 x 32 packed bytes -> 4096 bf16 elements


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _bf16(x):
        """fp32 -> the nearest bf16 value (ties to even), still fp32. Done on the bits rather
        than by a cast so the rounding is the same on every backend: Triton's CPU interpreter,
        which the tests run, truncates in its fp32 -> bf16 cast. Finite inputs only."""
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _dequant_nf4(q_ptr, qs_ptr, qf_ptr, mean_ptr, lut_ptr, out_ptr, n_blocks,
                     HALF_BLOCK: tl.constexpr, SCALER_BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
        """BLOCKS quantisation blocks per program, a [BLOCKS, HALF_BLOCK] tile of packed bytes:
        bf16 out[2i], out[2i+1] = lut[q[i] >> 4], lut[q[i] & 15], each x its block's scale
        bf16(bf16(qs / qf[block // SCALER_BLOCK]) + mean), computed once per block."""
        blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS]
        ok = blk < n_blocks
        qs = tl.load(qs_ptr + blk, mask=ok, other=0).to(tl.float32)
        qf = tl.load(qf_ptr + blk // SCALER_BLOCK, mask=ok, other=1.0).to(tl.float32)
        scale = _bf16(_bf16(tl.math.div_rn(qs, qf)) + tl.load(mean_ptr).to(tl.float32))
        byte = blk[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]  # [BLOCKS, HALF]
        q = tl.load(q_ptr + byte, mask=ok[:, None], other=0).to(tl.int32)
        hi = _bf16(tl.load(lut_ptr + (q >> 4)).to(tl.float32) * scale[:, None]).to(tl.bfloat16)
        lo = _bf16(tl.load(lut_ptr + (q & 15)).to(tl.float32) * scale[:, None]).to(tl.bfloat16)
        both = tl.reshape(tl.join(hi, lo), [BLOCKS, 2 * HALF_BLOCK])  # hi, lo, hi, lo, ...
        out = blk[:, None] * (2 * HALF_BLOCK) + tl.arange(0, 2 * HALF_BLOCK)[None, :]
        tl.store(out_ptr + out, both, mask=ok[:, None])


def dequant_flat(qdata: torch.Tensor, qscalers: torch.Tensor, qfactor: torch.Tensor,
                 mean: torch.Tensor, lut: torch.Tensor, block_size: int,
                 scaler_block_size: int) -> torch.Tensor:
    """The dense weight, flat [2 * qdata.numel()] bf16 (lut, qfactor and mean are bf16, as
    torchao stores them; see quant._dequant_flat for the layout)."""
    out = torch.empty(2 * qdata.numel(), dtype=torch.bfloat16, device=qdata.device)
    n_blocks = qscalers.numel()  # one scale per block of block_size elements
    if n_blocks:
        _dequant_nf4[(triton.cdiv(n_blocks, _BLOCKS),)](
            qdata, qscalers, qfactor, mean, lut, out, n_blocks,
            HALF_BLOCK=block_size // 2, SCALER_BLOCK=scaler_block_size, BLOCKS=_BLOCKS, num_warps=4)
    return out
