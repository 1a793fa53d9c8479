"""4-bit NormalFloat (NF4) base weights for QLoRA, via torchao's `NF4Tensor`.

torchao is optional: it is imported only when QLoRA is asked for, and a missing or too old
install is one clear `TunesmithError`. NF4 is pure PyTorch in torchao (no custom kernels), so it
runs on CPU as well as CUDA; the weight is dequantised to bf16 block by block inside each matmul.

Storage per weight [out, in]: 4 bits per element plus one 8-bit scale per 64 elements and one
fp32 scale per 256 such scales (double quantisation): ~0.52 bytes per element vs 2 for bf16.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from tunesmith.errors import TunesmithError

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
    """True for an NF4Tensor (also when wrapped in a Parameter); never imports torchao."""
    return type(t).__name__ == "NF4Tensor" or (
        isinstance(t, torch.nn.Parameter) and type(t.data).__name__ == "NF4Tensor"
    )


def check_quantizable(name: str, weight: torch.Tensor) -> None:
    """NF4 needs whole scale blocks: numel divisible by 64 and the block count by 256."""
    n = weight.numel()
    if n % BLOCK_SIZE or (n // BLOCK_SIZE) % SCALER_BLOCK_SIZE:
        raise TunesmithError(
            f"QLoRA: {name} weight {list(weight.shape)} has {n} elements; NF4 needs a multiple of "
            f"{BLOCK_SIZE * SCALER_BLOCK_SIZE} (use lora, or a model whose widths are multiples of 128)"
        )


def to_nf4(weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Quantise a dense weight [out, in]; it dequantises back to `dtype` for compute."""
    mod = _import_nf4()
    return mod.to_nf4(weight.detach().to(dtype))


def linear_nf4(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ dequant(weight [out, in]).T in the weight's dtype; autograd to x only."""
    mod = _import_nf4()
    return mod.linear_nf4(x.to(weight.dtype), weight)


def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dense copy [out, in] of an NF4 weight in `dtype` (NF4Tensor.to dequantises)."""
    return weight.to(dtype)
