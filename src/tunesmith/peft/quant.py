"""4-bit NormalFloat (NF4) base weights for QLoRA, via torchao's `NF4Tensor`.

torchao is optional: it is imported only when QLoRA is asked for, and a missing or too old
install is one clear `TunesmithError`. NF4 is pure PyTorch in torchao (no custom kernels), so it
runs on CPU as well as CUDA; each matmul dequantises its weight to bf16 for that call only.

Storage per weight [out, in]: 4 bits per element plus one 8-bit scale per 64 elements and one
fp32 scale per 256 such scales (double quantisation): ~0.52 bytes per element vs 2 for bf16.

Memory: the matmul is the custom op `tunesmith::nf4_linear`, opaque to torch.compile. Its
forward dequantises the weight, multiplies and drops the dense copy; its backward (another
opaque op) dequantises again. Only the NF4 storage is saved for backward, so at most one
layer's dense weight exists at a time, compiled or not, with or without activation
checkpointing, whatever the partitioner of the torch version at hand decides. (Traced through
torchao's `linear_nf4`, the dequantisation is plain graph ops that AOTAutograd's min-cut
partitioner would not recompute -- an index gather off its recompute allowlist, materialised
for the backward matmul -- so a compiled block saved every dense bf16 weight for backward:
~13 GiB on Llama-3-8B, 2.4x the NF4 model; seen on torch 2.13 for blocks compiled without
activation checkpointing.)
"""

from __future__ import annotations

import importlib
import logging
import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from tunesmith.errors import TunesmithError
from tunesmith.parallel.quantized import is_quantized
from tunesmith.peft import nf4_kernel
from tunesmith.switches import switch

MIN_TORCHAO = "0.7"
# NF4Tensor.from_tensor's defaults: 64 elements share a scale, 256 scales share a second-level one.
BLOCK_SIZE = 64
SCALER_BLOCK_SIZE = 256
# torchao moved the module in 0.18; older releases keep it under dtypes.
_MODULE_PATHS = (
    "torchao.quantization.quantize_.workflows.nf4.nf4_tensor",
    "torchao.dtypes.nf4tensor",
)
_cached: ModuleType | None = None


def _import_nf4() -> ModuleType:
    """The torchao module that defines NF4Tensor, to_nf4 and linear_nf4."""
    global _cached
    if _cached is not None:
        return _cached
    # torchao logs a warning per CUDA-only extension it cannot load on a CPU machine; NF4
    # needs none of them, so keep those lines out of the user's log.
    ao_log = logging.getLogger("torchao")
    level = ao_log.level
    ao_log.setLevel(logging.ERROR)
    try:
        importlib.import_module("torchao")
        errors = []
        for path in _MODULE_PATHS:
            try:
                mod = importlib.import_module(path)
            except ImportError as e:
                errors.append(str(e))
                continue
            if all(hasattr(mod, n) for n in ("NF4Tensor", "to_nf4", "linear_nf4")):
                _cached = mod
                return mod
    except Exception as e:  # noqa: BLE001 -- not installed, or built for another torch
        raise TunesmithError(
            f"QLoRA needs torchao>={MIN_TORCHAO} for NF4 weights (pip install torchao): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    finally:
        ao_log.setLevel(level)
    raise TunesmithError(
        f"QLoRA needs torchao>={MIN_TORCHAO} with NF4Tensor; the installed torchao has none "
        f"({'; '.join(errors) or 'module not found'})"
    )


def require_nf4() -> None:
    """Raise a clear TunesmithError now if NF4 is unavailable (called before any loading)."""
    _import_nf4()


def nf4_available() -> bool:
    try:
        _import_nf4()
    except TunesmithError:
        return False
    return True


def is_nf4(t: torch.Tensor) -> bool:
    """True for an NF4Tensor: bare, in a Parameter, or an FSDP2 shard (a DTensor over one);
    never imports torchao."""
    return is_quantized(t) or (isinstance(t, torch.nn.Parameter) and is_quantized(t.data))


def check_quantizable(name: str, weight: torch.Tensor) -> None:
    """NF4 needs whole scale blocks: numel divisible by 64 and the block count by 256."""
    n = weight.numel()
    if n % BLOCK_SIZE or (n // BLOCK_SIZE) % SCALER_BLOCK_SIZE:
        raise TunesmithError(
            f"QLoRA: {name} weight {list(weight.shape)} has {n} elements; NF4 needs a multiple of "
            f"{BLOCK_SIZE * SCALER_BLOCK_SIZE} (use lora, or a model whose widths are multiples of 128)"
        )


def check_shardable(name: str, shape: tuple[int, ...], shards: int) -> None:
    """FSDP2 cuts an NF4 weight [out, in] into `shards` row blocks of its storage: every block
    must hold whole rows and whole second-level scale blocks (64 x 256 elements), else the
    4-bit codes and their scales could not be split at the same place (no padding exists for
    them)."""
    rows, numel = shape[0], math.prod(shape)
    unit = BLOCK_SIZE * SCALER_BLOCK_SIZE
    if rows % shards or (numel // shards) % unit:
        raise TunesmithError(
            f"QLoRA over {shards} sharded ranks: {name} weight {list(shape)} cannot be split into "
            f"{shards} NF4 shards (each needs whole rows and a multiple of {unit} elements); use "
            "fewer dp_shard ranks (parallel.dp_shard, or strategy=hybrid_shard / no_shard)"
        )


def to_nf4(weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Quantise a dense weight [out, in]; it dequantises back to `dtype` for compute."""
    mod = _import_nf4()
    if weight.device.type == "meta" and hasattr(mod, "SubclassTensorArgs"):
        return _nf4_on_meta(mod, tuple(weight.shape), dtype)
    return mod.to_nf4(weight.detach().to(dtype))


def _nf4_on_meta(mod: ModuleType, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The NF4 tensor `to_nf4` would make of a [out, in] meta weight: storage shapes and dtypes
    only. torchao's from_tensor runs its quantisation loop (one step per 2**20 elements) even on
    meta: ~0.5 s per Qwen3-30B-A3B expert stack, ~50 s for the model, for no values."""
    numel = math.prod(shape)
    n_blocks = numel // BLOCK_SIZE
    meta = torch.device("meta")
    args = mod.SubclassTensorArgs(torch.Size(shape), torch.empty(shape, device=meta).stride(), 0, dtype, meta,
                                  False)
    return mod.NF4Tensor(args, BLOCK_SIZE, n_blocks, SCALER_BLOCK_SIZE,
                         torch.empty(n_blocks, dtype=torch.int8, device=meta),  # quantized_scalers
                         torch.empty(n_blocks // SCALER_BLOCK_SIZE, dtype=dtype, device=meta),  # factors
                         torch.empty((), dtype=dtype, device=meta),  # scaler_mean
                         torch.empty(numel // 2, dtype=torch.uint8, device=meta),  # two codes a byte
                         nf4=torch.empty(16, dtype=dtype, device=meta))


def linear_nf4(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ dequant(weight [out, in]).T in the weight's dtype; autograd to x only.

    Saves only the NF4 storage for backward (see the module docstring)."""
    x = x.to(weight.dtype)
    parts = _nf4_parts(weight)
    if parts is None:  # a layout we do not read ourselves: torchao's own op (eager-safe)
        return _import_nf4().linear_nf4(x, weight)
    return torch.ops.tunesmith.nf4_linear(x, *parts)


# ---------------------------------------------------------------------------- NF4 matmul op
# The five storage tensors of an NF4Tensor (its __tensor_flatten__ names) and its block sizes.
_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")


def _nf4_parts(weight: torch.Tensor) -> tuple | None:
    """(quantized_data, quantized_scalers, quantization_factor, scaler_mean, nf4, block_size,
    scaler_block_size, out, in) of a contiguous 2-D NF4 weight, else None."""
    if weight.dim() != 2 or weight.stride() != (weight.shape[1], 1):
        return None
    if not all(hasattr(weight, n) for n in (*_PARTS, "block_size", "scaler_block_size")):
        return None
    out_f, in_f = weight.shape
    return (*(getattr(weight, n) for n in _PARTS), int(weight.block_size),
            int(weight.scaler_block_size), int(out_f), int(in_f))


def _dequant_flat(qdata: Tensor, qscalers: Tensor, qfactor: Tensor, mean: Tensor, lut: Tensor,
                  block_size: int, scaler_block_size: int) -> Tensor:
    """The dense weight, flat [numel], in the lookup table's dtype; the same ops (so the same
    roundings, bit for bit) as torchao's NF4Tensor.get_original_weight.

    qdata [numel/2] uint8 holds two 4-bit codes per byte (high nibble first); qscalers
    [numel/block] int8 are the per-block scales, quantised against qfactor [numel/block/scaler
    block] around the scalar mean; lut [16] holds the NF4 code values."""
    scalers = (qscalers.view(-1, scaler_block_size) / qfactor.unsqueeze(-1)).flatten().to(lut.dtype) + mean
    scale = scalers.unsqueeze(-1)  # [blocks, 1], broadcast over the block's elements
    hi = lut[(qdata >> 4).long()].view(-1, block_size // 2)  # [blocks, block/2]
    lo = lut[(qdata & 0b1111).long()].view(-1, block_size // 2)
    return torch.stack([hi * scale, lo * scale], dim=-1).flatten()  # interleave: hi, lo, hi, lo


# Device types whose dequantisation runs compiled (one fused kernel, built on first use). CPU
# stays eager: compiling there costs more than it saves at the sizes that fit on a CPU.
COMPILED_DEQUANT_DEVICES = ("cuda",)
_compiled_dequant = None  # None: not built yet; False: compiling failed here, stay eager


def _dequant(qdata: Tensor, qscalers: Tensor, qfactor: Tensor, mean: Tensor, lut: Tensor,
             block_size: int, scaler_block_size: int, out_f: int, in_f: int) -> Tensor:
    """The dense weight [out, in]. On CUDA one Triton kernel (`nf4_kernel`, bf16 storage; the
    compiled expression with `TUNESMITH_NF4=compiled`, the A/B) or, without Triton, compiled:
    eager it is ~9 kernels with int64 codes in between, ~30 bytes of memory traffic per weight
    element vs ~2.5 fused."""
    global _compiled_dequant
    if _use_kernel(qdata, qfactor, mean, lut, block_size):
        return nf4_kernel.dequant_flat(qdata, qscalers, qfactor, mean, lut, block_size,
                                       scaler_block_size).view(out_f, in_f)
    fn = _dequant_flat
    if qdata.device.type in COMPILED_DEQUANT_DEVICES and _compiled_dequant is not False:
        if _compiled_dequant is None:
            # Round every bf16 intermediate as eager does, so compiled == eager bit for bit.
            from torch._inductor import config as inductor_config

            opts = {"emulate_precision_casts": True} if hasattr(inductor_config, "emulate_precision_casts") else {}
            _compiled_dequant = torch.compile(_dequant_flat, dynamic=None, options=opts)
        fn = _compiled_dequant
    try:
        with torch.no_grad():  # one grad mode, so one compiled variant for forward and backward
            w = fn(qdata, qscalers, qfactor, mean, lut, block_size, scaler_block_size)
    except Exception as e:  # no working compiler here: eager is correct, only slower
        if fn is _dequant_flat:
            raise
        logging.getLogger("tunesmith").warning("NF4: compiling the dequantisation failed (%s); using eager",
                                               f"{type(e).__name__}: {e}".splitlines()[0])
        _compiled_dequant = False
        with torch.no_grad():
            w = _dequant_flat(qdata, qscalers, qfactor, mean, lut, block_size, scaler_block_size)
    return w.view(out_f, in_f)


def _use_kernel(qdata: Tensor, qfactor: Tensor, mean: Tensor, lut: Tensor, block_size: int) -> bool:
    """Whether `_dequant` runs nf4_kernel: CUDA, Triton importable, bf16 storage and a
    power-of-two block (torchao's: 64), not pinned to the compiled expression by
    `TUNESMITH_NF4=compiled`."""
    if switch("TUNESMITH_NF4") == "compiled" or qdata.device.type != "cuda" or not nf4_kernel.available():
        return False
    pow2 = block_size >= 2 and block_size & (block_size - 1) == 0
    return pow2 and all(t.dtype == torch.bfloat16 for t in (qfactor, mean, lut))


@torch.library.custom_op("tunesmith::nf4_linear", mutates_args=())
def _nf4_linear_op(x: Tensor, qdata: Tensor, qscalers: Tensor, qfactor: Tensor, mean: Tensor,
                   lut: Tensor, block_size: int, scaler_block_size: int, out_f: int, in_f: int) -> Tensor:
    """x [..., in] @ W^T -> [..., out], W dequantised here and freed on return."""
    return F.linear(x, _dequant(qdata, qscalers, qfactor, mean, lut, block_size, scaler_block_size, out_f, in_f))


@_nf4_linear_op.register_fake
def _(x, qdata, qscalers, qfactor, mean, lut, block_size, scaler_block_size, out_f, in_f):
    return x.new_empty((*x.shape[:-1], out_f))


@torch.library.custom_op("tunesmith::nf4_linear_grad_input", mutates_args=())
def _nf4_grad_op(grad: Tensor, qdata: Tensor, qscalers: Tensor, qfactor: Tensor, mean: Tensor,
                 lut: Tensor, block_size: int, scaler_block_size: int, out_f: int, in_f: int) -> Tensor:
    """grad [..., out] @ W -> [..., in], W dequantised again (nothing dense was kept)."""
    return grad @ _dequant(qdata, qscalers, qfactor, mean, lut, block_size, scaler_block_size, out_f, in_f)


@_nf4_grad_op.register_fake
def _(grad, qdata, qscalers, qfactor, mean, lut, block_size, scaler_block_size, out_f, in_f):
    return grad.new_empty((*grad.shape[:-1], in_f))


def register_input_grad_autograd(op, grad_op, n_tensors: int) -> None:
    """Autograd for an NF4 matmul op with inputs (x, n_tensors tensors, non-tensor meta...):
    backward saves those tensors only (the NF4 storage, no activations, no dense weight) and
    returns x's gradient from `grad_op(grad, *tensors, *meta)`, which dequantises again; the
    weight is frozen, so nothing else gets a gradient. Shared by `nf4_linear` and the MoE
    experts' op (peft.quant_experts)."""

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[1:1 + n_tensors])
        ctx.meta, ctx.n_inputs = inputs[1 + n_tensors:], len(inputs)

    def backward(ctx, grad: Tensor):
        grad_x = grad_op(grad, *ctx.saved_tensors, *ctx.meta) if ctx.needs_input_grad[0] else None
        return (grad_x,) + (None,) * (ctx.n_inputs - 1)

    op.register_autograd(backward, setup_context=setup_context)


# saved: qdata, qscalers, qfactor, mean, lut
register_input_grad_autograd(_nf4_linear_op, torch.ops.tunesmith.nf4_linear_grad_input, 5)


def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dense copy [out, in] of an NF4 weight in `dtype` (NF4Tensor.to dequantises)."""
    return weight.to(dtype)
