"""Checkpoint files: durable writes, hashes, the manifest (build, read, verify entries), the
saved run config, and the disk-space check. No collectives here: `manager.py` decides which
rank calls what.

A checkpoint directory `step_XXXXXXXX/` holds the DCP shards, `config.yaml` and `manifest.json`
(format version, step, versions, world size, and every file with its size and sha256).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from tunesmith import __version__
from tunesmith.checkpoint.state import _tensor_bytes
from tunesmith.errors import TunesmithError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
CHUNK = 8 << 20
GIB = float(1 << 30)


# ----------------------------------------------------------------------------- filesystem


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # Makes renames/creations inside `path` durable; some platforms cannot open directories.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def plain(obj: Any, what: str) -> Any:
    """JSON-safe copy (tuples -> lists, Paths -> str) so YAML/JSON dumps never choke."""
    try:
        return json.loads(json.dumps(obj, default=str, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise TunesmithError(f"checkpoint {what} is not serialisable: {e}") from None


# ----------------------------------------------------------------------------- public helpers


def estimate_bytes(app_state: Mapping[str, Any]) -> int:
    """Approximate checkpoint size: the bytes of every tensor in the app state."""
    total = 0
    for obj in app_state.values():
        est = getattr(obj, "estimate_bytes", None)
        total += est() if callable(est) else _tensor_bytes(obj.state_dict())
    return total


def check_disk(root: str | Path, needed_bytes: int, name: str = "output.dir") -> None:
    """Fail early unless `root` is writable and has room for two checkpoints of this size.

    Two, because the new checkpoint is fully written before the oldest one is pruned. `name`
    is what the user calls `root` in error messages (training checks its output.dir).
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as e:
        raise TunesmithError(f"{name} {root} is not writable: {e.strerror or e}") from None
    free = shutil.disk_usage(root).free
    need = 2 * int(needed_bytes)
    if need > free:
        raise TunesmithError(
            f"not enough disk space under {root}: two checkpoints of ~{needed_bytes / GIB:.2f} GiB "
            f"need {need / GIB:.2f} GiB, only {free / GIB:.2f} GiB free"
        )


def build_manifest(tmp: Path, step: int, meta: Any, verify_mode: str, world_size: int) -> dict[str, Any]:
    """The manifest of the checkpoint written in `tmp`: every file with its size (and sha256)."""
    files = []
    for p in files_under(tmp):
        if p.name == MANIFEST:
            continue
        fsync_file(p)  # DCP already syncs its shards; this also covers config.yaml
        entry: dict[str, Any] = {"path": p.relative_to(tmp).as_posix(), "size": p.stat().st_size}
        if verify_mode == "sha256":
            entry["sha256"] = sha256(p)
        files.append(entry)
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "created_at": now.isoformat(timespec="seconds"),
        "created_unix": now.timestamp(),
        "torch_version": torch.__version__,
        "tunesmith_version": __version__,
        "world_size": world_size,
        "hash": verify_mode,
        "files": files,
        "meta": meta,
    }


def manifest_or_reason(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) for a usable checkpoint dir, else (None, why not)."""
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"missing {MANIFEST}"
    except (OSError, ValueError) as e:
        return None, f"unreadable {MANIFEST} ({type(e).__name__}: {e})"
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None, f"malformed {MANIFEST} (no file list)"
    if data.get("format_version") != FORMAT_VERSION:
        return None, f"unsupported manifest format_version {data.get('format_version')!r}"
    return data, None


def check_file(path: Path, entry: Mapping[str, Any], verify_mode: str) -> str | None:
    """None when the manifest entry's file is intact (to `verify_mode`), else the reason."""
    rel = str(entry.get("path", ""))
    f = path / rel
    if not rel or not f.is_file():
        return f"missing file {rel}"
    if verify_mode == "none":
        return None
    size = f.stat().st_size
    if size != entry.get("size"):
        return f"size mismatch for {rel}: manifest says {entry.get('size')} bytes, found {size}"
    want = entry.get("sha256")
    if verify_mode == "sha256" and want and sha256(f) != want:
        return f"checksum mismatch for {rel}"
    return None


def read_config(path: str | Path) -> dict[str, Any]:
    """The run config saved with the checkpoint ({} when it was saved without one)."""
    f = Path(path) / CONFIG
    if not f.is_file():
        return {}
    try:
        data = yaml.safe_load(f.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise TunesmithError(f"cannot read {f}: {e}") from None
    return data if isinstance(data, dict) else {}
