"""float8 frozen base for LoRA / DoRA (`peft.base_dtype=float8`): base matmuls in float8 e4m3,
adapters in their own dtype (bf16 compute under autocast).

The base weight W [out, in] is quantised once, when the base is frozen, and never changes:

    s = amax(|W|, per row) / 448          [out, 1] fp32 (448 = e4m3's largest finite value)
    W8 = e4m3(W / s)                      [out, in] 1 byte per element (bf16: 2)

forward   y = x W^T       x [N, in] is quantised per row (token): x8, s_x [N, 1];
                          y = _scaled_mm(x8, W8^T, s_x, s^T) [N, out] in bf16 (one float8 GEMM)
backward  dx = g W        W's row scales sit on the reduction dim here, so they are folded into
                          the gradient before its own per-row quantisation: g' = g * s^T [N, out],
                          dx = _scaled_mm(g'8, W8, s_g', 1) [N, in]. W8 is transposed to the
                          column-major layout the GEMM needs for that one call.
No weight gradient (the base is frozen), so nothing of x is saved for the base matmul: backward
keeps only W8 and s. Inside a compiled block the per-row amax, scaling and cast of x and g fuse
into one kernel each. `torch._scaled_mm` runs on CUDA GPUs with float8 (compute capability
>= 8.9) and, slowly, on CPU (used by the tests).
"""

from __future__ import annotations

import torch
from torch import nn

FLOAT8 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FLOAT8).max  # 448.0
# The float8 GEMM needs both dims of each operand to be multiples of 16.
ALIGN = 16


def is_float8(t: torch.Tensor) -> bool:
    return t.dtype == FLOAT8


def quantizable(weight: torch.Tensor) -> bool:
    out_f, in_f = weight.shape
    return out_f % ALIGN == 0 and in_f % ALIGN == 0


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [M, K] -> (t8 [M, K] e4m3, scale [M, 1] fp32) with t ~= t8 * scale, per row."""
    amax = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    t8 = (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FLOAT8)
    return t8, scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [out, in] in `dtype` (fp32 arithmetic, then cast)."""
    return (weight.float() * scale).to(dtype)


class _Float8BaseMatmul(torch.autograd.Function):
    """x [N, in] @ dequant(W8, s)^T -> [N, out]; gradient to x only (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
        x8, x_scale = quantize_rows(x)
        ctx.save_for_backward(w8, w_scale)
        ctx.grad_dtype = x.dtype
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.reshape(1, -1),
                                out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w8, w_scale = ctx.saved_tensors
        g8, g_scale = quantize_rows(grad.float() * w_scale.reshape(1, -1))  # [N, out]
        w_col = w8.t().contiguous().t()  # [out, in], column-major
        ones = torch.ones(1, w8.shape[1], device=w8.device, dtype=torch.float32)
        dx = torch._scaled_mm(g8, w_col, scale_a=g_scale, scale_b=ones, out_dtype=grad.dtype)
        return dx.to(ctx.grad_dtype), None, None, None


def linear_float8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ W^T -> [..., out] with a float8 base (W8 [out, in] e4m3, s [out, 1]).

    Output dtype: the autocast dtype when autocast is on, else x's (bf16 / fp32)."""
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    lead = x.shape[:-1]
    with torch.autocast(dev, enabled=False):
        y = _Float8BaseMatmul.apply(x.reshape(-1, x.shape[-1]), weight, scale, out_dtype)
    return y.reshape(*lead, weight.shape[0])


class Float8FrozenLinear(nn.Module):
    """A frozen linear layer whose weight [out, in] is float8 with fixed per-row scales (no
    adapter: a block linear that LoRA does not target)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        # Not persistent: the state dict keeps the base's keys; the scale is rebuilt on load.
        self.register_buffer("weight_scale", scale, persistent=False)
        self.bias = bias
        if bias is not None:
            bias.requires_grad_(False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Float8FrozenLinear:
        w8, scale = quantize_rows(linear.weight.detach())
        return cls(w8, scale, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear_float8(x, self.weight, self.weight_scale)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        dtype = dtype or torch.bfloat16
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = nn.Parameter(dequantize(self.weight, self.weight_scale, dtype), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        return lin

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, float8 e4m3 (row scales)"
