"""float8 for the stacked MoE experts under `train.float8` (Mixtral, Qwen3-MoE).

    float8_expert_targets(model, skip)   which `Experts` modules convert (the rule below)
    convert_float8_experts(model, names) swap them for `Float8Experts` in place

The experts hold most of an MoE model's weights and FLOPs, and they are 3-D parameters
(`w13` [E, 2I, D], `w2` [E, D, I]) that torchao's Float8Linear swap never sees. `Float8Experts`
runs their two grouped GEMMs through torchao's differentiable float8 grouped GEMM
(`torchao.prototype.moe_training._to_fp8_rowwise_then_scaled_grouped_mm`): e4m3 operands with
dynamic per-row scales (rounded to powers of two) in forward, input-gradient and
weight-gradient GEMMs. The scaling is always rowwise, whatever `train.float8` recipe the linear
layers use: it is the recipe torchao has for grouped GEMMs. Parameters keep their names, dtypes
and values, so optimizer state, checkpoints and HF export are unchanged.

The float8 grouped GEMM needs every expert's block of rows to be a multiple of 16 long (the
weight-gradient GEMM reduces over tokens, per expert). The rows arrive sorted by expert with
arbitrary counts, so `pad_groups` copies them into a zero-filled buffer where each block starts
on a multiple of 16. The buffer has a fixed size, N*k + 16*E rounded to 16 (so the block sizes,
not the shapes, depend on the routing, and compiled blocks see static shapes); the last expert's
block runs to the end of the buffer, so every row belongs to a block and the pad rows are
exact zeros (zero outputs, zero weight-gradient contributions). Cost: at most 16*E extra rows,
e.g. 2,048 on 65,536 for Qwen3-30B-A3B at 8k tokens.

The rule: a sparse layer's `Experts` converts when both weights' dims are multiples of 16, its
name matches no `train.float8_skip` glob (e.g. `*.experts` keeps every expert bf16), and the
experts are not split by expert parallelism (`parallel.ep`: its sharded grouped GEMM stays bf16,
logged; train.float8 with TP is refused by the config), and the GPU is Hopper or newer with bf16
compute (else the experts stay bf16, logged).
LoRA on the experts (`LoRAExperts`) is not converted either: `train.float8` does not apply to
adapters' frozen bases (that is `peft.base_dtype=float8`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.models.moe.model import Experts
from tunesmith.transforms.torchao_import import import_torchao

ALIGN = 16  # rows per expert block: a multiple of this (float8 grouped GEMM)


def float8_expert_targets(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """Names of the plain `Experts` modules that train in float8 under the rule above."""
    chosen = []
    for name, mod in model.named_modules():
        if type(mod) is not Experts or any(fnmatch.fnmatchcase(name, g) for g in skip):
            continue
        if all(d % ALIGN == 0 for w in (mod.w13, mod.w2) for d in w.shape[1:]):
            chosen.append(name)
    return chosen


def convert_float8_experts(model: nn.Module, names: Sequence[str]) -> None:
    """Make the named `Experts` modules `Float8Experts` (same parameters; only the class)."""
    if names:
        _grouped_mm_module()  # a missing or too old torchao: one clear error now
    wanted = set(names)
    for name, mod in model.named_modules():
        if name in wanted:
            mod.__class__ = Float8Experts


def _grouped_mm_module():
    return import_torchao("torchao.prototype.moe_training", "train.float8 (MoE experts)",
                          ("_to_fp8_rowwise_then_scaled_grouped_mm",))


def float8_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, in] bf16 rows in expert blocks ending at offs [E] (multiples of 16, offs[-1] = M)
    times each block's expert weight w [E, out, in] (fp32 master or bf16) -> [M, out] bf16."""
    mm = _grouped_mm_module()._to_fp8_rowwise_then_scaled_grouped_mm
    # w.transpose(-2, -1) is [E, in, out] with strides (in*out, 1, in): per-expert column-major,
    # the layout the float8 GEMM needs for its right operand.
    return mm(x, w.transpose(-2, -1), offs, out_dtype=torch.bfloat16,
              pad_token_groups_for_grouped_mm=False)


def pad_groups(xs: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows sorted by expert (xs [R, D], counts [E] summing to R) -> (buffer [P, D] with each
    expert's rows starting on a multiple of ALIGN and zeros elsewhere, end offsets [E] int32 of
    the padded blocks (the last one = P), the buffer row of each input row [R]).
    P = R + ALIGN*E rounded up to ALIGN: fixed by the shapes, not by the routing."""
    n_rows, n_exp = xs.shape[0], counts.shape[0]
    size = -(-(n_rows + ALIGN * n_exp) // ALIGN) * ALIGN
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN  # [E]
    pad_start = torch.cumsum(padded, 0) - padded  # [E] first buffer row of each block
    start = torch.cumsum(counts, 0) - counts  # [E] first input row of each expert
    expert = torch.repeat_interleave(torch.arange(n_exp, device=xs.device), counts,
                                     output_size=n_rows)  # [R] expert of each row
    dest = pad_start[expert] + torch.arange(n_rows, device=xs.device) - start[expert]  # [R]
    buf = xs.new_zeros(size, xs.shape[1]).index_copy(0, dest, xs)
    offs = torch.cumsum(padded, 0)
    offs = torch.cat([offs[:-1], offs.new_full((1,), size)]).to(torch.int32)
    return buf, offs, dest


class Float8Experts(Experts):
    """`Experts` whose CUDA grouped GEMMs run in float8 (rowwise scales) on padded blocks."""

    # The grouped GEMM used on the padded blocks; a test can put an exact one here to check the
    # padding on CPU, where float8 GEMMs do not run.
    grouped_mm = staticmethod(float8_grouped_mm)

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [N*k, D] sorted by expert (counts [E]) -> [N*k, D] (bf16 from the float8 GEMM)."""
        # The compute dtype as `Experts._grouped` picks it: autocast's, else the weights'
        # (bf16 wherever this class is used: see `float8_expert_targets`' caller).
        dtype = (torch.get_autocast_dtype(xs.device.type)
                 if torch.is_autocast_enabled(xs.device.type) else self.w13.dtype)
        buf, offs, dest = pad_groups(xs.to(dtype), counts)  # [P, D], [E], [N*k]
        gate, up = self.grouped_mm(buf, self.w13, offs).chunk(2, dim=-1)  # [P, I] each
        # pad rows: silu(0) * 0 = 0, so the second GEMM's pad rows stay exact zeros too
        return self.grouped_mm(F.silu(gate) * up, self.w2, offs)[dest]  # [N*k, D]
