"""Llama-Adapter in peft's `ADAPTION_PROMPT` format: `adapter_config.json` +
`adapter_model.safetensors`, loadable by `peft.PeftModel.from_pretrained(<transformers model>,
dir)`, and peft's own adaption-prompt adapters load here. Tensor names are peft's:

    base_model.model.<HF attention path>.adaption_prompt   [1, adapter_len, hidden]
    base_model.model.<HF attention path>.adaption_gate     [1]

for the top `adapter_layers` blocks (HF attention path e.g. model.layers.3.self_attn).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from tunesmith.checkpoint import load_weights_file
from tunesmith.errors import TunesmithError
from tunesmith.hf import io as hfio
from tunesmith.models.family import AdaptionPoint
from tunesmith.parallel.loading import copy_full_into
from tunesmith.peft.adaption import GATE, PROMPT, adaption_modules, apply_adaption_prompt, attention_paths
from tunesmith.peft.io import ADAPTER_CONFIG, PREFIX, weights_file, write_adapter_dir
from tunesmith.peft.targets import KeyAdapter

PEFT_TYPE = "ADAPTION_PROMPT"
_KEY_RE = re.compile(rf"^(.+)\.({PROMPT}|{GATE})$")


def adaption_state_dict(model: nn.Module, point: AdaptionPoint, adapter: KeyAdapter
                        ) -> dict[str, torch.Tensor]:
    """peft key -> host tensor for every prompt and gate (a collective when sharded)."""
    hf_of = attention_paths(model, point, adapter)
    out: dict[str, torch.Tensor] = {}
    for name, mod in adaption_modules(model).items():
        for local in (PROMPT, GATE):
            t = getattr(mod, local)
            full = t.full_tensor() if isinstance(t, DTensor) else t
            out[f"{PREFIX}{hf_of[name]}.{local}"] = full.detach().to("cpu").contiguous()
    return out


def adaption_config(model: nn.Module, point: AdaptionPoint, adapter: KeyAdapter,
                    base_model: str | None) -> dict[str, Any]:
    """adapter_config.json (peft AdaptionPromptConfig fields) describing the model's prompts."""
    mods = adaption_modules(model)
    if not mods:
        raise TunesmithError("the model has no adaption prompts to save")
    target = next(iter(attention_paths(model, point, adapter).values())).rpartition(".")[2]
    return {
        "peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "adapter_len": int(next(iter(mods.values())).adaption_prompt.shape[1]),
        "adapter_layers": len(mods), "target_modules": target, "inference_mode": True,
        "revision": None,
    }


def save_adaption(model: nn.Module, point: AdaptionPoint, adapter: KeyAdapter, out_dir: str | Path,
                  *, base_model: str | None = None, tokenizer: Any = None) -> Path:
    """Write the prompts as a PEFT adapter dir atomically (rank 0 writes; call on every rank)."""
    cfg = adaption_config(model, point, adapter, base_model)
    return write_adapter_dir(out_dir, adaption_state_dict(model, point, adapter), cfg, tokenizer)


@dataclass
class AdaptionFiles:
    """An adaption-prompt adapter as read from disk."""

    path: Path
    adapter_len: int
    adapter_layers: int
    tensors: dict[str, dict[str, torch.Tensor]]  # HF attention path -> {adaption_prompt, adaption_gate}


def read_adaption(path: str | Path) -> AdaptionFiles:
    """Read and validate an ADAPTION_PROMPT adapter directory."""
    d = Path(path).expanduser()
    if not (d / ADAPTER_CONFIG).is_file():
        raise TunesmithError(f"{d} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    cfg = hfio.read_json(d / ADAPTER_CONFIG)
    if cfg.get("peft_type") != PEFT_TYPE:
        raise TunesmithError(f"{d}: peft_type {cfg.get('peft_type')!r} is not a Llama-Adapter "
                             f"({PEFT_TYPE}); use peft.method lora / dora for LoRA adapters")
    try:
        length, layers = int(cfg["adapter_len"]), int(cfg["adapter_layers"])
    except (KeyError, TypeError, ValueError) as e:
        raise TunesmithError(f"{d}: adapter_config.json needs integer adapter_len and "
                             f"adapter_layers ({e})") from None
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_weights_file(weights_file(d)).items():
        m = _KEY_RE.match(key.removeprefix(PREFIX))
        if m is None:
            raise TunesmithError(f"{d}: tensor {key} is not an adaption prompt or gate")
        groups.setdefault(m.group(1), {})[m.group(2)] = t
    return AdaptionFiles(d, length, layers, groups)


def _check(model: nn.Module, point: AdaptionPoint, adapter: KeyAdapter, files: AdaptionFiles) -> None:
    """Every adapted block of the model has exactly its prompt and gate, in the right shapes."""
    hf_of = attention_paths(model, point, adapter)
    want_blocks = list(hf_of.values())[-files.adapter_layers:] if files.adapter_layers else []
    if files.adapter_layers > len(hf_of) or set(files.tensors) != set(want_blocks):
        raise TunesmithError(f"adapter {files.path} does not match the base model: it adapts "
                             f"{len(files.tensors)} attention modules, adapter_layers="
                             f"{files.adapter_layers}, the model has {len(hf_of)} blocks")
    dim = model.get_submodule(next(iter(hf_of))).wq.in_features
    shapes = {PROMPT: (1, files.adapter_len, dim), GATE: (1,)}
    for hf, tensors in files.tensors.items():
        for local, shape in shapes.items():
            got = tuple(tensors[local].shape) if local in tensors else None
            if got != shape:
                raise TunesmithError(f"adapter {files.path}: {hf}.{local} is "
                                     f"{list(got) if got else 'missing'}, the model needs {list(shape)}")


@torch.no_grad()
def load_adaption(model: nn.Module, point: AdaptionPoint, adapter: KeyAdapter, path: str | Path,
                  *, dtype: torch.dtype = torch.float32, values: bool = True) -> AdaptionFiles:
    """Give `model` the adaption prompts stored at `path` (frozen base, trainable prompts).

    values=False only adds the parameters (a meta-device model about to be sharded);
    `copy_adaption_values` fills them once the shards exist."""
    files = read_adaption(path)
    _check(model, point, adapter, files)
    apply_adaption_prompt(model, point, files.adapter_len, files.adapter_layers, dtype=dtype)
    if values:
        copy_adaption_values(model, point, adapter, files)
    return files


@torch.no_grad()
def copy_adaption_values(model: nn.Module, point: AdaptionPoint, adapter: KeyAdapter,
                         files: AdaptionFiles) -> None:
    """Copy the stored prompts and gates into the model's (possibly sharded) parameters."""
    hf_of = attention_paths(model, point, adapter)
    mods = adaption_modules(model)
    for native, hf in hf_of.items():
        if hf in files.tensors:
            for local, t in files.tensors[hf].items():
                copy_full_into(getattr(mods[native], local), t)
