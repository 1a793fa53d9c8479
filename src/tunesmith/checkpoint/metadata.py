"""Read a DCP checkpoint's `.metadata` without running code from it.

DCP writes `.metadata` with plain `pickle`, and its `FileSystemReader` loads it the same way,
so opening a checkpoint from an untrusted source could execute anything. The metadata only
ever needs DCP's own dataclasses, torch sizes/dtypes/layouts and paths, so `SafeMetadataReader`
unpickles it with an allowlist of exactly those; a file naming any other global (a function such
as `os.system`) is refused unless the caller opts in (`--allow-unsafe-pickle`).

This covers the metadata and the tensor shards (DCP reads those with `weights_only=True`).
Non-tensor entries (RNG, loader and scheduler state) are pickled blobs that DCP itself unpickles
without restriction, which is why resuming needs a checkpoint from a trusted source; exporting
reads only model tensors, so it never touches them.
"""

from __future__ import annotations

import importlib
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from tunesmith.errors import TunesmithError

__all__ = ["SafeMetadataReader", "read_metadata", "saved_tensors"]

METADATA_FILE = ".metadata"
_DCP_PREFIX = "torch.distributed.checkpoint."
_PATH_CLASSES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}
_SAFE_BUILTINS = {"set", "frozenset", "slice", "complex", "bytearray"}
_SAFE_FUNCTIONS = {("torch.serialization", "_get_layout")}  # maps a layout name to torch.layout


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_FUNCTIONS:
            return super().find_class(module, name)
        if module == "builtins" and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        if module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        if module == "pathlib" and name in _PATH_CLASSES:
            return getattr(pathlib, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        if module.startswith(_DCP_PREFIX):
            # Only classes: constructing DCP's dataclasses/enums runs no user-visible code,
            # whereas a module-level function (e.g. a save routine) could do anything.
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type):
                return obj
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


class SafeMetadataReader(FileSystemReader):
    """`FileSystemReader` whose `.metadata` goes through the allowlist unless `allow_pickle`."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False) -> None:
        super().__init__(str(path))
        self.allow_pickle = allow_pickle

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.allow_pickle:
            return super().read_metadata(*args, **kwargs)
        metadata = read_metadata(Path(str(self.path)), allow_pickle=False)
        # Same bookkeeping as the base class, which we bypass.
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_metadata(path: str | Path, *, allow_pickle: bool = False) -> Metadata:
    """The DCP `Metadata` of checkpoint directory `path`."""
    f = Path(path) / METADATA_FILE
    if not f.is_file():
        raise TunesmithError(f"{path} is not a checkpoint: it has no {METADATA_FILE} file")
    try:
        with open(f, "rb") as fh:
            md = (pickle.Unpickler(fh) if allow_pickle else _RestrictedUnpickler(fh)).load()
    except pickle.UnpicklingError as e:
        if "refusing" in str(e) and not allow_pickle:
            raise TunesmithError(
                f"checkpoint metadata {f} references code outside torch's checkpoint classes "
                f"({str(e).removeprefix('refusing to load global ')}); pass --allow-unsafe-pickle "
                "only if you trust its source"
            ) from None
        raise TunesmithError(f"cannot read checkpoint metadata {f}: {e}") from None
    except (OSError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise TunesmithError(f"cannot read checkpoint metadata {f}: {type(e).__name__}: {e}") from None
    if not isinstance(md, Metadata):
        raise TunesmithError(f"{f} is not DCP checkpoint metadata (got {type(md).__name__})")
    return md


def saved_tensors(path: str | Path, prefix: str = "", *, allow_pickle: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Flattened key -> (global shape, dtype) of every tensor under `prefix` in the checkpoint.

    Keys are DCP's flattened names, e.g. `model.layers.0.attention.wq.weight`; `prefix` is
    stripped. Headers only: no tensor data is read.
    """
    md = read_metadata(path, allow_pickle=allow_pickle)
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for key, entry in md.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata) and key.startswith(prefix):
            out[key[len(prefix):]] = (tuple(entry.size), entry.properties.dtype)
    return out
