"""`tunesmith export`: a training checkpoint -> a Hugging Face model directory.

A training checkpoint carries everything export needs: the model tensors (DCP shards), the
model's HF `config.json` and the tokenizer files under `hf/`. Export verifies the manifest,
reads only the model tensors (never the pickled optimizer/RNG/loader entries), checks names and
shapes against the config before allocating, and writes safetensors (sharded with an index
above `max_shard_size`), config and tokenizer through the same atomic writer as `OUTPUT/final`.

Safety: tensors are read with `weights_only=True` and the DCP metadata through an allowlist
unpickler (`tunesmith.checkpoint.metadata`); `allow_pickle` lifts the latter for checkpoints
whose metadata legitimately names other classes.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn

from tunesmith.checkpoint.manager import MANIFEST, CheckpointManager
from tunesmith.checkpoint.metadata import SafeMetadataReader, saved_tensors
from tunesmith.checkpoint.state import ModelState
from tunesmith.errors import TunesmithError
from tunesmith.hf import io as hfio
from tunesmith.models.io import as_dtype, build_model, save_pretrained, write_hf_dir
from tunesmith.models.registry import resolve_model_config

__all__ = ["export_hf", "find_checkpoint", "load_checkpoint_model", "parse_size"]

log = logging.getLogger("tunesmith")

HF_SUBDIR = "hf"
_MODEL_PREFIX = "model."
_HF_CONFIG_FILES = ("config.json", "generation_config.json")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20; a bare number is bytes."""
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise TunesmithError(f"invalid size {text!r}: use e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def find_checkpoint(source: str | Path) -> Path:
    """A checkpoint dir as given, or the newest valid checkpoint of a run output dir."""
    path = Path(source).expanduser()
    if not path.exists():
        raise TunesmithError(f"checkpoint {path} does not exist")
    if (path / MANIFEST).is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = CheckpointManager(path).latest_complete()
        if found is None:
            raise TunesmithError(f"{path} holds no valid checkpoint under {path / 'checkpoints'}")
        return found
    raise TunesmithError(f"{path} is not a checkpoint (no {MANIFEST}) nor a run directory with checkpoints/")


def _verify(path: Path) -> None:
    reason = CheckpointManager(path.parent.parent, verify="sha256").verify(path)
    if reason is not None:
        raise TunesmithError(f"checkpoint {path} failed verification: {reason}")


def _checked_layout(path: Path, allow_pickle: bool) -> tuple[Any, Any, nn.Module, dict[str, Any]]:
    """(family, config, meta model, saved {fqn: (shape, dtype)}) with shapes checked, no data read."""
    hf_dir = path / HF_SUBDIR
    if not (hf_dir / "config.json").is_file():
        raise TunesmithError(f"checkpoint {path} has no {HF_SUBDIR}/config.json (saved by an older tunesmith?)")
    family, cfg = resolve_model_config(str(hf_dir))
    model = build_model(family, cfg, device="meta")
    saved = saved_tensors(path, _MODEL_PREFIX, allow_pickle=allow_pickle)
    if not saved:
        raise TunesmithError(f"checkpoint {path} holds no model tensors")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = sorted(k for k in expected if k not in saved or saved[k][0] != expected[k])
    if wrong and wrong[0] not in saved and (reason := _trained_only(path)):
        raise TunesmithError(
            f"checkpoint {path} holds only the tensors its run trained ({reason}), not a whole "
            "model, and `tunesmith export` writes whole models: use the run's final/ directory "
            "(a LoRA run's is a PEFT adapter; `tunesmith merge BASE ADAPTER --out DIR` folds it "
            "into its base)"
        )
    if wrong:
        k = wrong[0]
        got = list(saved[k][0]) if k in saved else "missing"
        raise TunesmithError(
            f"checkpoint {path} does not match its {HF_SUBDIR}/config.json: {k} is {got}, "
            f"expected {list(expected[k])}"
        )
    return family, cfg, model, saved


def _trained_only(path: Path) -> str | None:
    """Why checkpoint `path` holds a subset of the model (its run froze weights: adapters or
    frozen blocks, whose frozen base comes from model.name), read from its config.yaml; None
    for a full fine-tune or an unreadable config."""
    try:
        peft = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("peft") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if peft.get("method", "none") != "none":
        return f"peft.method={peft['method']}"
    if peft.get("freeze_layers") or peft.get("num_freeze_layers") or peft.get("freeze_embeddings"):
        return "peft.freeze_layers / num_freeze_layers / freeze_embeddings"
    return None


def _dcp_read(path: Path, state: dict[str, Any], allow_pickle: bool) -> None:
    """Fill `state` ({"model": {fqn: tensor}}) in place from the checkpoint's DCP shards."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
            dcp.load(state, storage_reader=SafeMetadataReader(path, allow_pickle=allow_pickle))
    except TunesmithError:
        raise
    except Exception as e:  # noqa: BLE001 -- DCP wraps reader errors in several types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TunesmithError(f"could not read model tensors from {path}: {first}") from e


def load_checkpoint_model(path: Path, *, allow_pickle: bool = False) -> tuple[Any, Any, nn.Module]:
    """(family, model config, model on CPU in the saved dtype) from a training checkpoint.

    Holds the whole model in host memory; `export_hf` streams instead.
    """
    family, cfg, model, saved = _checked_layout(path, allow_pickle)
    dtype = next(iter(saved.values()))[1]
    model.to(dtype=dtype)
    model.to_empty(device="cpu")  # re-ties embeddings, recomputes RoPE
    state = {"model": ModelState(model).state_dict()}
    _dcp_read(path, state, allow_pickle)
    ModelState(model).load_state_dict(state["model"])
    return family, cfg, model.eval()


class _CopyTokenizerFiles:
    """Stands in for a tokenizer in `save_pretrained`: copies the checkpoint's tokenizer files."""

    def __init__(self, src: Path) -> None:
        self.files = [p for p in sorted(src.iterdir()) if p.is_file() and p.name not in _HF_CONFIG_FILES]

    def save_pretrained(self, out_dir: str) -> None:
        for f in self.files:
            shutil.copy2(f, Path(out_dir) / f.name)


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    allow_pickle: bool = False,
) -> Path:
    """Write checkpoint `checkpoint` (or a run dir's newest) as an HF model dir at `out_dir`.

    Streams: one output file's tensors at a time are read from the DCP shards (whatever number
    of ranks wrote them) and written, so host memory holds at most `max_shard_size`, never the
    whole model, and no GPU is involved.
    """
    path = find_checkpoint(checkpoint)
    _verify(path)
    shard = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    if shard <= 0:
        raise TunesmithError(f"--max-shard-size must be positive, got {max_shard_size!r}")
    family, cfg, model, saved = _checked_layout(path, allow_pickle)
    tokenizer = _CopyTokenizerFiles(path / HF_SUBDIR)
    if not tokenizer.files:
        log.warning("checkpoint %s has no tokenizer files; exporting the model only", path)
    if family.save_fn is not None:  # generic HF families save through transformers: whole model
        _, _, full = load_checkpoint_model(path, allow_pickle=allow_pickle)
        with torch.no_grad():
            save_pretrained(full, family, cfg, out_dir, tokenizer=tokenizer,
                            max_shard_size_bytes=shard, dtype=dtype)
        log.info("exported %s -> %s", path, out_dir)
        return Path(out_dir)
    order = [k for k in model.state_dict() if k in saved]  # the model's own tensor order
    _stream_to_hf(path, family, cfg, {k: saved[k] for k in order}, out_dir, tokenizer, shard, dtype,
                  allow_pickle)
    log.info("exported %s -> %s", path, out_dir)
    return Path(out_dir)


def _stream_to_hf(path: Path, family: Any, cfg: Any, saved: dict[str, Any], out_dir: str | Path,
                  tokenizer: Any, max_shard: int, dtype: str | None, allow_pickle: bool) -> None:
    """HF safetensors written file by file; each file's tensors come from one partial DCP load."""
    adapter, target = family.adapter(cfg), as_dtype(dtype)
    fqn_of = {hf: fqn for fqn in saved if (hf := adapter.native_key_to_hf(fqn)) is not None}
    names = list(fqn_of)

    def nbytes(name: str) -> int:
        shape, dt = saved[fqn_of[name]]
        return math.prod(shape) * (target or dt).itemsize

    # The same plan save_safetensors_sharded makes, so each file is one DCP read.
    groups = hfio.plan_shards([(n, nbytes(n)) for n in names], max_shard)
    group_of = {n: i for i, group in enumerate(groups) for n in group}
    cache: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in cache:
            group = groups[group_of[name]]
            want = {fqn_of[n]: torch.empty(saved[fqn_of[n]][0], dtype=saved[fqn_of[n]][1]) for n in group}
            state = {"model": want}
            _dcp_read(path, state, allow_pickle)
            cache.clear()
            cache.update({n: state["model"][fqn_of[n]] for n in group})
        t = adapter.tensor_to_hf(fqn_of[name], cache.pop(name))  # ours -> HF layout
        return t.to(target or t.dtype).contiguous()

    write_hf_dir(out_dir, cfg, names, get, nbytes, saved_dtype=target or next(iter(saved.values()))[1],
                 tokenizer=tokenizer, max_shard_size_bytes=max_shard)
