"""LoRA on the stacked expert weights of the MoE family (peft's `target_parameters`).

The experts of a sparse layer are two 3-D parameters, `experts.w13` [E, 2I, D] and
`experts.w2` [E, D, I] (transformers 5: `mlp.experts.gate_up_proj` / `down_proj`). peft adapts
such a parameter with `lora.ParamWrapper`: each expert e gets its own rank-r pair, and the
weight the experts compute with is

    W'_e = W_e + s * B_e @ A_e        W_e [out, in], A_e [r, in], B_e [out, r], s = alpha / r

(alpha / sqrt(r) with rsLoRA). peft forbids dropout and DoRA there (dropout on x cannot be
factored out of a merged weight), and so do we. `LoRAExperts` replaces a model's `experts`
module from outside, keeps its `w13` / `w2` Parameters (base state-dict keys do not move) and
adds, per targeted weight, an `ExpertLoRA` holding A [E, r, in] and B [E, out, r].

Instead of materialising W' (what peft does: a full [E, out, in] copy per step, and its
[E, out, in] gradient in backward), the update runs on the tokens: each row x routed to expert
e gets x W_e^T + s (x A_e^T) B_e^T. Equal to peft's up to rounding (in bf16 it is the more
accurate of the two: a small s B A is not rounded into bf16 W); it costs two thin matmuls
[n, in] x [in, r] and [n, r] x [r, out] per projection, and its activations are [n, r].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.models.moe.model import Experts
from tunesmith.peft import quant
from tunesmith.peft.lora import LoRASpec

WEIGHTS = ("w13", "w2")  # the experts' parameters, in registration order (peft's nesting order)
# grouped GEMM operands need 16-byte aligned rows: the rank is padded to a multiple of 8
_GROUPED_ALIGN = 8


def check_expert_spec(spec: LoRASpec) -> None:
    """What peft's ParamWrapper refuses, refused the same way (before any module changes)."""
    if spec.dora:
        raise TunesmithError("LoRA on MoE experts (peft.target_parameters) does not support DoRA "
                             "(nor does peft); use peft.method=lora")
    if spec.dropout > 0:
        raise TunesmithError("LoRA on MoE experts (peft.target_parameters) needs peft.dropout=0: "
                             "peft's ParamWrapper folds the update into the weight, where input "
                             "dropout cannot act")


def init_a(n_experts: int, r: int, in_features: int, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """A [E, r, in] drawn as peft draws it: one kaiming-uniform(a=sqrt(5)) [E*r, in] matrix
    (fan_in = in, so every element is U(-1/sqrt(in), 1/sqrt(in))), expert-major rows."""
    a = torch.empty(n_experts * r, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a.view(n_experts, r, in_features)


class ExpertLoRA(nn.Module):
    """The low-rank update of one stacked expert weight W [E, out, in]."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, spec: LoRASpec,
                 dtype: torch.dtype) -> None:
        super().__init__()
        n_exp, out_f, in_f = shape  # the weight's logical [E, out, in], whatever its storage
        self.spec, self.scaling = spec, spec.scaling
        dev = device
        self.lora_A = nn.Parameter(torch.empty(n_exp, spec.r, in_f, device=dev, dtype=dtype))  # [E, r, in]
        self.lora_B = nn.Parameter(torch.zeros(n_exp, out_f, spec.r, device=dev, dtype=dtype))  # [E, out, r]
        if dev.type != "meta":
            with torch.no_grad():
                self.lora_A.copy_(init_a(n_exp, spec.r, in_f))

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """x in the adapters' dtype, unless autocast decides the matmul dtype."""
        if torch.is_autocast_enabled(x.device.type) or x.dtype == self.lora_A.dtype:
            return x
        return x.to(self.lora_A.dtype)

    def loop_delta(self, rows: torch.Tensor, e: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """s * B_e (A_e rows): rows [n_e, in] -> [n_e, out] (s rides on B [out, r]). a / b: A
        [E', r, in] / B [E', out, r] as this process computes with them (all experts, or this
        rank's when TP / EP split them; e indexes them)."""
        low = F.linear(self._input(rows), a[e])  # [n_e, r]
        return F.linear(low, b[e] * self.scaling)

    def grouped_delta(self, x: torch.Tensor, offs: torch.Tensor, a: torch.Tensor, b: torch.Tensor
                      ) -> torch.Tensor:
        """The update of every routed row in two grouped GEMMs, in x's dtype:
        x [N*k, in] @ A^T [E', in, r'] -> [N*k, r'];  then @ (s B)^T [E', r', out] -> [N*k, out].
        r' = r padded with zero rows of A / zero columns of B to a multiple of 8 (the grouped
        GEMM's alignment); the padding adds exact zeros and gets zero gradient. a / b as in
        `loop_delta`."""
        pad = -self.spec.r % _GROUPED_ALIGN
        a = F.pad(a, (0, 0, 0, pad)).to(x.dtype)  # [E', r', in]
        b = F.pad(b * self.scaling, (0, pad)).to(x.dtype)  # [E', out, r']
        low = torch._grouped_mm(x, a.transpose(-2, -1), offs=offs)  # [N*k, r']
        return torch._grouped_mm(low, b.transpose(-2, -1), offs=offs)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s * B_e A_e for every expert: [E, out, in] in fp32 (what merging adds to W)."""
        return self.scaling * torch.bmm(self.lora_B.float(), self.lora_A.float())

    # -- peft's tensor layout --------------------------------------------------------------
    # peft stores A as nn.Linear(in, r*E).weight [E*r, in] (row e*r + j is expert e's j-th
    # row) and B as nn.Linear(r*E, out).weight [out, r*E] (column j*E + e: rank-major).
    @staticmethod
    def to_peft(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Ours A [E, r, in] / B [E, out, r] (full tensors) -> peft's A [E*r, in] / B [out, r*E]."""
        n_exp, r, in_f = a.shape
        return {"lora_A": a.reshape(n_exp * r, in_f).contiguous(),
                "lora_B": b.permute(1, 2, 0).reshape(b.shape[1], r * n_exp).contiguous()}

    @staticmethod
    def from_peft(a: torch.Tensor, b: torch.Tensor, n_experts: int) -> dict[str, torch.Tensor]:
        """peft's A [E*r, in] / B [out, r*E] -> ours A [E, r, in] / B [E, out, r]."""
        r = a.shape[0] // n_experts
        return {"lora_A": a.reshape(n_experts, r, a.shape[1]),
                "lora_B": b.reshape(b.shape[0], r, n_experts).permute(2, 0, 1).contiguous()}

    def peft_shapes(self) -> dict[str, tuple[int, ...]]:
        n_exp, r, in_f = self.lora_A.shape
        return {"lora_A": (n_exp * r, in_f), "lora_B": (self.lora_B.shape[1], r * n_exp)}

    def extra_repr(self) -> str:
        n_exp, r, in_f = self.lora_A.shape
        return f"experts={n_exp}, in={in_f}, out={self.lora_B.shape[1]}, r={r}, scaling={self.scaling:g}"


class LoRAExperts(Experts):
    """`Experts` whose targeted weights (`lora["w13"]`, `lora["w2"]`) carry a trainable
    per-expert low-rank update; the base weights are frozen and keep their names."""

    # False inside `peft.lora.adapters_disabled`: the frozen experts alone (task=dpo's reference).
    adapters_on: bool = True

    def __init__(self, experts: Experts, spec: LoRASpec, names: tuple[str, ...],
                 adapter_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)  # no fresh weights: take over the given experts' Parameters
        check_expert_spec(spec)
        self.w13, self.w2 = experts.w13, experts.w2
        for w in (self.w13, self.w2):
            w.requires_grad_(False)
        self.spec = spec
        self.shapes = {n: experts.weight_shape(n) for n in WEIGHTS}  # [E, out, in] (NF4 stores 2-D)
        self.lora = nn.ModuleDict({n: ExpertLoRA(self.shapes[n], getattr(self, n).device, spec, adapter_dtype)
                                   for n in names})

    def expert_param_names(self) -> list[str]:
        # A [E, r, in] / B [E, out, r] are per expert too: TP / EP split them with the experts
        return [*super().expert_param_names(),
                *(f"lora.{n}.{t}" for n in self.lora for t in ("lora_A", "lora_B"))]

    def _pieces(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.local_piece(f"lora.{name}.lora_A"), self.local_piece(f"lora.{name}.lora_B")

    def expert_linear(self, name: str, rows: torch.Tensor, e: int) -> torch.Tensor:
        out = super().expert_linear(name, rows, e)  # [n_e, out]
        if name not in self.lora or not self.adapters_on:
            return out
        return out + self.lora[name].loop_delta(rows, e, *self._pieces(name)).to(out.dtype)

    def grouped_linear(self, name: str, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        out = super().grouped_linear(name, x, offs)  # [N*k, out]
        if name not in self.lora or not self.adapters_on:
            return out
        return out + self.lora[name].grouped_delta(x, offs, *self._pieces(name))

    @torch.no_grad()
    def to_experts(self, dtype: torch.dtype | None = None) -> Experts:
        """Plain frozen `Experts` holding W + s B A (computed in fp32, stored in `dtype`,
        default the base weights')."""
        plain = Experts.__new__(Experts)  # Experts(cfg) would allocate fresh [E, ...] weights
        nn.Module.__init__(plain)
        for name in WEIGHTS:
            out_dtype = dtype or getattr(self, name).dtype  # NF4: bf16
            w = dense_weight(self, name, torch.float32 if name in self.lora else out_dtype)
            merged = w + self.lora[name].delta_weight() if name in self.lora else w
            plain.register_parameter(name, nn.Parameter(merged.to(out_dtype), requires_grad=False))
        return plain

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by local name (`w13.lora_A`, ...)."""
        return {f"{n}.{k}": p for n, m in self.lora.items() for k, p in m.named_parameters()}


def dense_weight(experts: Experts, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weight `name` of `experts` as a dense [E, out, in] tensor in `dtype` (default: its own;
    bf16 for NF4, which dequantises from its [E*out, in] storage)."""
    w = getattr(experts, name).detach()
    if quant.is_nf4(w):
        return quant.dequantize(w, dtype or w.dtype).reshape(experts.weight_shape(name))
    return w.to(dtype or w.dtype)


def expert_lora_modules(model: nn.Module) -> dict[str, LoRAExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAExperts)}
