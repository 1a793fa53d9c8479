"""Device and precision, decided once at setup and then only read.

Low in the layering (imports only `errors` and `models.attention` for the SDPA kernel
priority), so `parallel`, `objective`, `eval`, `build` and `train` can all depend on it.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

from tunesmith.errors import TunesmithError
from tunesmith.models.attention import configure_sdpa
from tunesmith.switches import check_switches

log = logging.getLogger("tunesmith")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # the precision actually used: fp32 | bf16 | fp16 | bf16-pure
    param_dtype: torch.dtype  # dtype the weights (and optimizer state) live in
    autocast_dtype: torch.dtype | None  # None = no autocast

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast_dtype or self.param_dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range.
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TunesmithError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def resolve_runtime(device_name: str, precision: str) -> Runtime:
    device = resolve_device(device_name)
    if device.type == "cpu" and precision in ("bf16", "fp16"):
        # CPU autocast is slower than fp32 on most CPUs and fp16 scaling is CUDA-only;
        # the numbers would be worse for no gain, so run fp32. Training says so once, in its
        # "model ..." line after setup succeeded (never right before an error).
        precision = "fp32"
    if device.type == "cuda" and precision in ("bf16", "bf16-pure") and not torch.cuda.is_bf16_supported():
        raise TunesmithError(f"precision={precision} needs a GPU with bf16 support; use fp16")
    table = {
        "fp32": (torch.float32, None),
        "bf16": (torch.float32, torch.bfloat16),
        "fp16": (torch.float32, torch.float16),
        "bf16-pure": (torch.bfloat16, None),
    }
    param_dtype, autocast_dtype = table[precision]
    check_switches()
    if device.type == "cuda":
        # TF32 for the few fp32 matmuls left (e.g. fp32 runs): same range, ~8x the rate.
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"
        kernel = configure_sdpa(device)
        if kernel != "default":
            log.debug("attention: SDPA prefers the %s kernel on this GPU", kernel)
    return Runtime(device, precision, param_dtype, autocast_dtype)


def precision_note(requested: str, rt: Runtime) -> str:
    """The precision a run uses, and why when it is not the one asked for."""
    if requested == rt.precision:
        return rt.precision
    return f"{rt.precision}: train.precision={requested} is used on GPUs only"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Dense bf16 tensor-core peaks (no sparsity), in TFLOP/s, from the vendors' datasheets.
_PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.2,
}


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's bf16 dense peak, or None when unknown (then MFU is not reported)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None
