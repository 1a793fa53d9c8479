"""`tunesmith merge BASE ADAPTER --out DIR`: fold a PEFT adapter into its base model.

The base is loaded dense (also for adapters trained with QLoRA: merging into the original
weights, not a dequantised NF4 copy), each adapter is folded in fp32 (W + s B A, or DoRA's
m / ||W + s B A|| * (W + s B A)), and the result is written as an ordinary HF model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tunesmith.data import load_tokenizer
from tunesmith.errors import TunesmithError
from tunesmith.hf import io as hfio
from tunesmith.models import build_model, load_pretrained, resolve_model_config, save_pretrained
from tunesmith.peft.io import load_adapter
from tunesmith.peft.transform import merge_lora

log = logging.getLogger("tunesmith")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _base_dtype(base: str, requested: str) -> torch.dtype:
    """`auto`: the dtype the base checkpoint declares in its config.json, else fp32."""
    if requested != "auto":
        if requested not in _DTYPES:
            raise TunesmithError(f"--dtype must be auto, fp32, bf16 or fp16, got {requested!r}")
        return _DTYPES[requested]
    cfg_file = Path(base).expanduser() / "config.json"
    if cfg_file.is_file():
        hf = hfio.read_json(cfg_file)
        name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
        return _HF_DTYPES.get(name.replace("torch.", ""), torch.float32)
    return torch.float32


def first_tokenizer(*sources: str) -> Any:
    """The first tokenizer found among `sources` (adapter dir first), or None."""
    for src in sources:
        d = Path(src).expanduser()
        if d.is_dir() and any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return load_tokenizer(str(d))
    return None


def merge_adapter(base: str, adapter_dir: str, out_dir: str, *, dtype: str = "auto",
                  device: str = "cpu") -> Path:
    """Load `base`, apply the adapter at `adapter_dir`, merge, save an HF model to `out_dir`."""
    out = Path(out_dir).expanduser().resolve()
    if out in (Path(base).expanduser().resolve(), Path(adapter_dir).expanduser().resolve()):
        raise TunesmithError(f"--out {out} must differ from the base and adapter directories")
    family, model_cfg = resolve_model_config(base)
    save_dtype = _base_dtype(base, dtype)
    model = build_model(family, model_cfg, device="meta")
    load_pretrained(model, base, device=device, dtype=save_dtype)
    files = load_adapter(model, family.adapter(model_cfg), adapter_dir)
    n = merge_lora(model)
    save_pretrained(model, family, model_cfg, out, tokenizer=first_tokenizer(adapter_dir, base),
                    dtype=save_dtype)
    log.info("merged %d adapters (r=%d%s) from %s into %s -> %s (%s)", n, files.spec.r,
             ", dora" if files.spec.dora else "", adapter_dir, base, out, save_dtype)
    return out
