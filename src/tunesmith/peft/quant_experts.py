"""QLoRA on MoE experts: the stacked expert weights stored in NF4, dequantised per layer on use.

The experts are >95% of an MoE model's weights (Mixtral-8x7B: 45.1B of 46.7B parameters;
Qwen3-30B-A3B: 29.0B of 30.5B), so QLoRA must hold them in NF4 (`peft.method=qlora` does;
the router stays bf16, like the norms). Storage: each stacked weight W [E, out, in] is one
torchao `NF4Tensor` of shape [E*out, in] -- the whole stack, not one tensor per expert:

  * an NF4 block (64 consecutive elements sharing one scale) never crosses an expert, since
    `in` is a multiple of 64 in every MoE checkpoint: a row is whole blocks, an expert whole rows;
  * only the second-level scale groups (256 blocks) and the one mean of the double
    quantisation span experts; quantising per expert instead would change nothing that
    matters and cost E tensors per weight (6,144 parameters on Qwen3-30B-A3B);
  * one tensor is what FSDP2 shards by rows, so a shard holds whole experts (E % shards == 0);
  * torchao's NF4Tensor is 2-D only (from_tensor, split, FSDP all-gather), hence [E*out, in].
  NF4's rule (numel a multiple of 64 x 256) then applies to the whole stack.

Compute (the memory contract of `quant.nf4_linear`): `tunesmith::nf4_experts_linear` is an
opaque custom op that dequantises the whole stack, runs the grouped GEMM (CUDA bf16) or the
per-expert loop (CPU) and drops the dense copy; its backward (another opaque op) dequantises
again. Only the NF4 storage is saved for backward, so compiled blocks and activation
checkpointing never keep a dense expert stack. Transient bf16 per projection call:

    Qwen3-30B-A3B  w13 [128, 1536, 2048] 0.81 GB   w2 [128, 2048, 768]  0.40 GB
    Mixtral-8x7B   w13 [8, 28672, 4096]  1.88 GB   w2 [8, 4096, 14336]  0.94 GB

(the two projections of a layer run one after the other: the peak is the w13 copy). LoRA on
the experts (`peft.experts.ExpertLoRA`) adds its update on the tokens, outside the op, exactly
as on a bf16 base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tunesmith.models.moe.model import Experts
from tunesmith.peft import quant
from tunesmith.peft.experts import WEIGHTS, LoRAExperts, dense_weight


def _segments(offs: Tensor) -> list[tuple[int, int]]:
    """(start, end) rows of each expert from offs [E] (end row of each block; one host sync)."""
    ends = offs.tolist()
    return list(zip([0, *ends[:-1]], ends))


def _experts_mm(x: Tensor, w: Tensor, offs: Tensor, grouped: bool, transpose: bool) -> Tensor:
    """Rows of x [N, a] sorted by expert, each through its expert's W [E, out, in]:
    x W_e^T ([N, out], a = in) or, with `transpose`, x W_e ([N, in], a = out)."""
    if grouped:
        return torch._grouped_mm(x, w if transpose else w.transpose(-2, -1), offs=offs)
    outs = [F.linear(x[s:e], w[i].t() if transpose else w[i]) for i, (s, e) in enumerate(_segments(offs))]
    return torch.cat(outs)


def _dense_stack(parts: tuple, n_exp: int) -> Tensor:
    """The dense [E, out, in] bf16 stack of one NF4 weight's storage (quant._dequant: one fused
    kernel on CUDA), looked up at call time so tests can count the copies."""
    *storage, block, scaler_block, rows, in_f = parts
    return quant._dequant(*storage, block, scaler_block, rows, in_f).view(n_exp, rows // n_exp, in_f)


@torch.library.custom_op("tunesmith::nf4_experts_linear", mutates_args=())
def _nf4_experts_op(x: Tensor, offs: Tensor, qdata: Tensor, qscalers: Tensor, qfactor: Tensor,
                    mean: Tensor, lut: Tensor, block_size: int, scaler_block_size: int, rows: int,
                    in_f: int, n_exp: int, grouped: bool) -> Tensor:
    """x [N, in] (rows sorted by expert, block e ends at offs[e]) -> [N, out]; the dense stack
    [E, out, in] exists only inside this call."""
    w = _dense_stack((qdata, qscalers, qfactor, mean, lut, block_size, scaler_block_size, rows, in_f), n_exp)
    return _experts_mm(x, w, offs, grouped, transpose=False)


@_nf4_experts_op.register_fake
def _(x, offs, qdata, qscalers, qfactor, mean, lut, block_size, scaler_block_size, rows, in_f, n_exp, grouped):
    return x.new_empty((x.shape[0], rows // n_exp))


@torch.library.custom_op("tunesmith::nf4_experts_linear_grad_input", mutates_args=())
def _nf4_experts_grad_op(grad: Tensor, offs: Tensor, qdata: Tensor, qscalers: Tensor, qfactor: Tensor,
                         mean: Tensor, lut: Tensor, block_size: int, scaler_block_size: int, rows: int,
                         in_f: int, n_exp: int, grouped: bool) -> Tensor:
    """grad [N, out] -> [N, in] = grad_e @ W_e per expert, the stack dequantised again."""
    w = _dense_stack((qdata, qscalers, qfactor, mean, lut, block_size, scaler_block_size, rows, in_f), n_exp)
    return _experts_mm(grad, w, offs, grouped, transpose=True)


@_nf4_experts_grad_op.register_fake
def _(grad, offs, qdata, qscalers, qfactor, mean, lut, block_size, scaler_block_size, rows, in_f, n_exp, grouped):
    return grad.new_empty((grad.shape[0], in_f))


# saved: offs + the NF4 storage (qdata, qscalers, qfactor, mean, lut): no activations, no dense stack
quant.register_input_grad_autograd(_nf4_experts_op, torch.ops.tunesmith.nf4_experts_linear_grad_input, 6)


def nf4_experts_linear(x: Tensor, weight: Tensor, n_exp: int, offs: Tensor, grouped: bool) -> Tensor:
    """x [N, in] (rows sorted by expert) through NF4 experts `weight` [E*out, in] -> [N, out]
    in bf16; autograd to x only."""
    x = x.to(weight.dtype)
    parts = quant._nf4_parts(weight)
    if parts is None:  # a layout we do not read ourselves: dense copy in autograd (eager only)
        w = quant.dequantize(weight, weight.dtype).view(n_exp, -1, weight.shape[1])
        return _experts_mm(x, w, offs, grouped, transpose=False)
    *storage, block, scaler_block, rows, in_f = parts
    return torch.ops.tunesmith.nf4_experts_linear(x, offs, *storage, block, scaler_block, rows, in_f,
                                                  n_exp, grouped)


def to_nf4_stack(w: Tensor) -> Tensor:
    """A stacked weight [E, out, in] as one NF4 tensor [E*out, in] (bf16 in, as quant.to_nf4)."""
    return quant.to_nf4(w.detach().reshape(-1, w.shape[-1]))


class NF4Experts(Experts):
    """Frozen experts whose `w13` / `w2` are NF4 [E*out, in] (logical [E, out, in] in `shapes`);
    every projection runs through `nf4_experts_linear`. Parameter names are the base's."""

    def __init__(self, experts: Experts) -> None:
        nn.Module.__init__(self)
        self.shapes = {n: experts.weight_shape(n) for n in WEIGHTS}
        for n in WEIGHTS:
            setattr(self, n, nn.Parameter(to_nf4_stack(getattr(experts, n)), requires_grad=False))

    def _loop(self, xs: Tensor, counts: Tensor) -> Tensor:
        return self._mlp(xs, torch.cumsum(counts, 0), grouped=False)

    def _grouped(self, xs: Tensor, counts: Tensor) -> Tensor:
        # NF4 computes in bf16 (its dtype), the grouped GEMM's dtype
        return self._mlp(xs, torch.cumsum(counts, 0).to(torch.int32), grouped=True)

    def _mlp(self, xs: Tensor, offs: Tensor, grouped: bool) -> Tensor:
        """SwiGLU of every routed row: xs [N*k, D] -> [N*k, D] (bf16)."""
        gate, up = self.nf4_project("w13", xs, offs, grouped).chunk(2, dim=-1)  # [N*k, I] each
        return self.nf4_project("w2", F.silu(gate) * up, offs, grouped)

    def nf4_project(self, name: str, x: Tensor, offs: Tensor, grouped: bool) -> Tensor:
        """x [N*k, in] through weight `name` of each row's expert -> [N*k, out]; LoRA on the
        experts (QLoRAExperts) adds its update here."""
        return nf4_experts_linear(x, getattr(self, name), self.weight_shape(name)[0], offs, grouped)

    @torch.no_grad()
    def to_experts(self, dtype: torch.dtype | None = None) -> Experts:
        """Plain frozen `Experts` holding the dequantised weights (bf16 unless `dtype`)."""
        plain = Experts.__new__(Experts)
        nn.Module.__init__(plain)
        for name in WEIGHTS:
            plain.register_parameter(name, nn.Parameter(dense_weight(self, name, dtype), requires_grad=False))
        return plain


class QLoRAExperts(LoRAExperts, NF4Experts):
    """LoRA on NF4 experts: `NF4Experts`' compute plus `LoRAExperts`' per-expert update (the
    same ExpertLoRA tensors, names and PEFT files as on a bf16 base)."""

    def nf4_project(self, name: str, x: Tensor, offs: Tensor, grouped: bool) -> Tensor:
        out = super().nf4_project(name, x, offs, grouped)  # [N*k, out] bf16
        if name not in self.lora or not self.adapters_on:
            return out
        lora, ab = self.lora[name], self._pieces(name)  # A [E, r, in], B [E, out, r]
        if grouped:
            return out + lora.grouped_delta(x.to(out.dtype), offs, *ab)
        deltas = [lora.loop_delta(x[s:e], i, *ab) for i, (s, e) in enumerate(_segments(offs)) if e > s]
        return out + torch.cat(deltas).to(out.dtype)


def quantize_experts(mod: Experts) -> Experts:
    """The NF4 version of a sparse layer's experts: NF4Experts, or QLoRAExperts keeping the
    adapters of a LoRAExperts (adapters added before quantising, the assembly order)."""
    if isinstance(mod, NF4Experts):
        return mod
    if not isinstance(mod, LoRAExperts):
        return NF4Experts(mod)
    q = QLoRAExperts.__new__(QLoRAExperts)
    nn.Module.__init__(q)
    q.spec, q.shapes, q.lora = mod.spec, dict(mod.shapes), mod.lora
    for n in WEIGHTS:
        setattr(q, n, nn.Parameter(to_nf4_stack(getattr(mod, n)), requires_grad=False))
    return q


def lora_experts_class(mod: Experts) -> type[LoRAExperts]:
    """The class `apply_lora` wraps `mod` in: QLoRAExperts over NF4 experts."""
    return QLoRAExperts if isinstance(mod, NF4Experts) else LoRAExperts


__all__ = ["NF4Experts", "QLoRAExperts", "lora_experts_class", "nf4_experts_linear",
           "quantize_experts", "to_nf4_stack"]
