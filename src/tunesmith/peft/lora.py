"""The LoRA / DoRA linear layer that replaces a frozen `nn.Linear` from outside the model.

    LoRA:  y = x W^T + b + s * B (A (drop x))          s = alpha / r   (alpha / sqrt(r): rsLoRA)
    DoRA:  y = m / ||W + s B A||_row * (x W^T + s B A x) + b        (the norm is a constant)

Shapes: W [out, in] frozen (dense, NF4 for QLoRA, or float8 e4m3 with row scales s [out, 1]), A [r, in], B [out, r], m [out].
A is kaiming-uniform(a=sqrt(5)) and B zero, exactly as peft initialises them, so a fresh adapter
leaves the model's outputs unchanged. The layer keeps the replaced module's parameter names
(`weight`, `bias`), so the base model's state-dict keys do not move.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.peft import float8, quant


@dataclass(frozen=True)
class LoRASpec:
    """Hyper-parameters of one adapter (shared by every targeted layer)."""

    r: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise TunesmithError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise TunesmithError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise TunesmithError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


# LoRA layers that read the same input run their A matrices as one matmul (see
# `LoRALinear.forward_shared`); tests switch it off to compare against one call per layer.
SHARE_INPUT = True


def _autocast_on(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (optionally DoRA)."""

    # False inside `adapters_disabled`: the layer is its frozen base alone (task=dpo's reference).
    adapters_on: bool = True

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, spec: LoRASpec,
                 adapter_dtype: torch.dtype, weight_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.spec = spec
        self.scaling = spec.scaling
        self.quantized = quant.is_nf4(weight)
        self.weight = weight
        self.weight.requires_grad_(False)
        # float8 base (peft.base_dtype=float8): fixed per-row scales [out, 1], not in the state dict.
        self.float8 = weight_scale is not None
        self.register_buffer("weight_scale", weight_scale, persistent=False)
        self.bias = bias
        if bias is not None:
            bias.requires_grad_(False)
        dev = weight.device
        self.lora_A = nn.Parameter(torch.empty(spec.r, in_features, device=dev, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, spec.r, device=dev, dtype=adapter_dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        if spec.dora:
            # ||W + s B A|| per output row = ||W|| at init (B = 0), so m leaves outputs unchanged.
            self.lora_magnitude = nn.Parameter(self.base_row_norm().to(adapter_dtype))
        else:
            self.register_parameter("lora_magnitude", None)

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: LoRASpec, adapter_dtype: torch.dtype) -> LoRALinear:
        """Wrap an `nn.Linear` (or an `NF4Linear` / `Float8FrozenLinear`), taking over its
        Parameters (no copy)."""
        return cls(linear.weight, linear.bias, spec, adapter_dtype, getattr(linear, "weight_scale", None))

    @staticmethod
    def tp_param_dims() -> dict[str, tuple[int | None, int | None]]:
        """How tensor parallelism splits the adapters along with the base weight
        (`parallel.tp`): {name: (dim under colwise, dim under rowwise)}, None = replicated.
        Colwise splits W [out, in] by output rows, so B [out, r] splits by rows and A [r, in]
        stays whole: each rank adds s B_local (A x) to its slice of the output. Rowwise splits W
        by input columns, so A splits by columns and B stays whole: A_local x_local is a partial
        sum [.., r] that is reduced together with the base output's partial sum."""
        return {"lora_A": (None, 1), "lora_B": (0, None)}

    # -- pieces ----------------------------------------------------------------------------
    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight [out, in] as a plain tensor in `dtype` (dequantised when NF4). A
        sharded (DTensor) weight is gathered first: a collective, call it on every rank."""
        from torch.distributed.tensor import DTensor

        if isinstance(self.weight, DTensor):
            return self.weight.full_tensor().to(dtype)
        if self.float8:
            return float8.dequantize(self.weight, self.weight_scale, dtype)
        return quant.dequantize(self.weight, dtype) if self.quantized else self.weight.to(dtype)

    def _base(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """x [..., in] -> x W^T (+ b) [..., out] in the base's compute dtype."""
        bias = self.bias if with_bias else None
        if self.quantized:
            y = quant.linear_nf4(x, self.weight)  # bf16 compute, weight dequantised per call
            return y + bias.to(y.dtype) if bias is not None else y
        if self.float8:
            y = float8.linear_float8(x, self.weight, self.weight_scale)  # float8 GEMM, bf16 out
            return y + bias.to(y.dtype) if bias is not None else y
        if not _autocast_on(x) and x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)  # e.g. fp32 activations into a bf16 base, no autocast
        return F.linear(x, self.weight, bias)

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """x cast to the adapters' dtype, unless autocast already decides the matmul dtype."""
        return x if _autocast_on(x) or x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)

    def _up(self, low: torch.Tensor) -> torch.Tensor:
        """s * B low: [..., r] -> [..., out]."""
        return F.linear(low, self.lora_B * self.scaling)

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        """s * B(A x): [..., in] -> [..., out] (LoRA adds it to the base output; DoRA rescales)."""
        return self._up(F.linear(self._adapter_input(x), self.lora_A))

    def _add_adapter(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + s * B(A x) [..., out]: two thin matmuls, then a plain add.

        s rides on B ([out, r], cast to the compute dtype in the same kernel), so no scaling
        pass touches the [N, out] activation. The add is left to the compiler: inside a
        compiled block it fuses into one pointwise kernel, which measured faster than
        accumulating with `addmm` (whose out-of-place form first copies the base output):
        Llama-3-8B shape LoRA on an H200, 16,672 vs 16,401 tokens/s (benchmarks/RESULTS.md).
        """
        return out + self._adapter(x).to(out.dtype)

    @torch.no_grad()
    def base_row_norm(self) -> torch.Tensor:
        """||W|| per output row [out] in fp32: DoRA's magnitude at init (B = 0). Collective
        when W is sharded (see `dense_weight`)."""
        return torch.linalg.vector_norm(self.dense_weight(torch.float32), dim=1)

    @torch.no_grad()
    def _row_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row [out], in fp32 and detached (DoRA paper, section 4.3)."""
        delta = self.lora_B.float() @ self.lora_A.float()  # [out, in]
        return torch.linalg.vector_norm(self.dense_weight(torch.float32) + self.scaling * delta, dim=1)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base(x)  # [..., out]
        if not self.adapters_on:
            return out
        xa = self.dropout(x) if self.spec.dropout > 0 and self.training else x
        if self.lora_magnitude is None:
            return self._add_adapter(out, xa)
        return self._dora(out, xa, self._adapter(xa))

    @staticmethod
    def forward_shared(x: torch.Tensor, layers: tuple[LoRALinear, ...]) -> tuple[torch.Tensor, ...] | None:
        """Several LoRA layers on one input x [..., in] (q/k/v, gate/up): outputs [..., out_i].

        Their A matrices run as one [sum r, in] matmul, so x is read once for the rank-r
        projections in forward and once for all their A gradients in backward (the low-rank
        matmuls are memory-bound: their cost is reading x). Each layer then adds its own
        B update to its own base output. None (one call per layer instead) for DoRA, active
        dropout, or tensor-parallel (DTensor) adapters.
        """
        from torch.distributed.tensor import DTensor

        if any(isinstance(m.lora_A, DTensor) for m in layers):
            return None  # tensor parallel: each layer through its own module call (TP's input hooks)
        if not all(m.adapters_on for m in layers):
            return tuple(m._base(x) for m in layers)
        if not SHARE_INPUT or any(
            m.lora_magnitude is not None or (m.spec.dropout > 0 and m.training) for m in layers
        ):
            return None
        a = torch.cat([m.lora_A for m in layers])  # [sum r, in]
        low = F.linear(layers[0]._adapter_input(x), a)  # [..., sum r]
        outs = []
        for m, part in zip(layers, low.split([m.lora_A.shape[0] for m in layers], dim=-1)):
            out = m._base(x)
            outs.append(out + m._up(part).to(out.dtype))  # [..., out_i]
        return tuple(outs)

    def _dora(self, out: torch.Tensor, xa: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        """DoRA as peft computes it: out + (m/n - 1) * W xa + m/n * s B A xa.

        Without dropout W xa is the base output minus bias, so nothing is recomputed; with
        dropout active the base matmul runs again on the dropped input, as in peft.
        """
        scale = self.lora_magnitude / self._row_norm()  # [out], broadcasts over [..., out]
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_nobias = out if self.bias is None else out - self.bias.to(out.dtype)
        else:
            base_nobias = self._base(xa, with_bias=False)
        return (out + (scale - 1) * base_nobias + scale * lora).to(out.dtype)

    # -- merging -------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W' [out, in] in fp32 such that x W'^T + b equals this layer's (eval) output."""
        w = self.dense_weight(torch.float32) + self.scaling * (self.lora_B.float() @ self.lora_A.float())
        if self.lora_magnitude is not None:
            w = (self.lora_magnitude.float() / torch.linalg.vector_norm(w, dim=1)).unsqueeze(1) * w
        return w

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain frozen nn.Linear holding the merged weight (in the base's dtype by default)."""
        dtype = dtype or (torch.bfloat16 if self.float8 else self.weight.dtype)
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = nn.Parameter(self.merged_weight().to(dtype), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        return lin

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by their local name (lora_A, lora_B[, lora_magnitude])."""
        names = ("lora_A", "lora_B", "lora_magnitude")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def extra_repr(self) -> str:
        kind = "dora" if self.lora_magnitude is not None else "lora"
        q = ", nf4" if self.quantized else ", float8" if self.float8 else ""
        return (f"in={self.in_features}, out={self.out_features}, {kind} r={self.spec.r}, "
                f"scaling={self.scaling:g}{q}")


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight [out, in] is stored in NF4 (QLoRA, no adapter)."""

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        if bias is not None:
            bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant.linear_nf4(x, self.weight)  # [..., out] in bf16
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        dtype = dtype or self.weight.dtype
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = nn.Parameter(quant.dequantize(self.weight, dtype), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        return lin


def switchable_adapters(model: nn.Module) -> list[nn.Module]:
    """The modules whose adapters `adapters_disabled` switches off: LoRA / DoRA layers and LoRA
    on MoE experts (`peft.experts.LoRAExperts`), i.e. every class with an `adapters_on` flag."""
    return [m for m in model.modules() if hasattr(type(m), "adapters_on")]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, every LoRA / DoRA layer of `model` is its frozen base alone: the model
    computes the policy the run started from (task=dpo's reference, with no second copy). A
    compiled block sees the switch as a guard and keeps one graph for each state."""
    layers = switchable_adapters(model)
    for m in layers:
        m.adapters_on = False
    try:
        yield
    finally:
        for m in layers:
            del m.adapters_on  # back to the class default (True)
