"""Load a weights file without executing code from it unless the user explicitly opts in.

`.safetensors` is plain data. `.bin/.pt/.pth` are pickles: `torch.load(weights_only=True)`
only rebuilds tensors and primitive containers; a file that names any other global (a class,
a function such as `os.system`) needs full unpickling, which can run arbitrary code, so it is
refused unless `allow_pickle=True` (the CLI's `--allow-unsafe-pickle`).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tunesmith.errors import TunesmithError, first_line

__all__ = ["load_weights_file", "PICKLE_SUFFIXES", "SAFETENSORS_SUFFIX"]

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Training scripts often wrap the state dict; unwrap these one level when the top is not flat.
_WRAPPER_KEYS = ("state_dict", "model", "module")
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def load_weights_file(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Tensor dict (on CPU) from a `.safetensors`, `.bin`, `.pt` or `.pth` file."""
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return _load_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _as_tensor_dict(path, _load_pickle(path, allow_pickle=allow_pickle))
    raise TunesmithError(
        f"unsupported weights file {path}: expected {SAFETENSORS_SUFFIX} or one of {', '.join(PICKLE_SUFFIXES)}"
    )


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise TunesmithError(f"cannot read safetensors file {path}: {first_line(e)}") from None


def _load_pickle(path: Path, *, allow_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needs_code = _GLOBAL_RE.search(str(e))
        if not needs_code:
            raise TunesmithError(f"cannot read weights file {path}: not a valid torch pickle") from None
        if not allow_pickle:
            raise TunesmithError(
                f"weights file {path} needs arbitrary code to unpickle (it references {needs_code.group(1)}); "
                "pass --allow-unsafe-pickle only if you trust its source, or convert it to .safetensors"
            ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise TunesmithError(f"cannot read weights file {path}: {first_line(e)}") from None
    try:
        # Reached only with the explicit opt-in above.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 -- any failure of a foreign pickle is the file's fault
        raise TunesmithError(f"cannot unpickle weights file {path}: {first_line(e)}") from None


def _as_tensor_dict(path: Path, obj: Any) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and not _is_flat(obj):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and _is_flat(inner):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise TunesmithError(f"weights file {path} holds a {type(obj).__name__}, expected a dict of tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise TunesmithError(
                f"weights file {path} is not a flat dict of tensors: key {key!r} holds {type(value).__name__}"
            )
    return dict(obj)


def _is_flat(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
