"""Atomic, verified, keep-last-K training checkpoints on top of torch.distributed.checkpoint.

Layout: `root/checkpoints/step_{step:08d}/` holding the DCP files (`.metadata`, `*.distcp`),
`config.yaml` (the resolved run config) and, written last, `manifest.json` (every file with its
size and optionally sha256). A save goes to `root/checkpoints/.tmp-step_XXXXXXXX-<uuid>/` and
is renamed into place only once complete and fsynced, so a crash never leaves a directory that
looks like a checkpoint. Old checkpoints are pruned only after the new one is in place.

Distributed: `dcp.save`/`dcp.load` are collective (every rank calls them and writes its own
shards); everything touching the directory tree (mkdir, manifest, rename, prune, cleanup) runs
on rank 0 between barriers, and rank 0 broadcasts its outcome so all ranks fail together.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from tunesmith.checkpoint.files import (
    CONFIG,
    MANIFEST,
    build_manifest,
    check_disk,
    check_file,
    estimate_bytes,
    fsync_dir,
    manifest_or_reason,
    plain,
    read_config,
    write_durable,
)
from tunesmith.checkpoint.state import Stateful, process_rank
from tunesmith.errors import TunesmithError

__all__ = ["CONFIG", "MANIFEST", "CheckpointManager", "VerifyMode", "check_disk", "estimate_bytes"]

log = logging.getLogger("tunesmith")

VerifyMode = Literal["sha256", "size", "none"]
_VERIFY_MODES = ("sha256", "size", "none")
_TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


# ----------------------------------------------------------------------------- distributed


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_rank0() -> bool:
    return process_rank() == 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (identity when not distributed)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns on every call that it "assumes a single process" when no group exists; that
    # is exactly our intent, so the warning is noise there (and kept when distributed).
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        yield


def _root_cause(exc: BaseException) -> BaseException:
    """The first failing rank's own exception inside a DCP CheckpointException (else `exc`)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        return next(iter(exc.failures.values()))[0]
    return exc


def _dcp_reason(exc: BaseException) -> str:
    """One line from a DCP failure: the underlying exception, not the multi-rank traceback."""
    exc = _root_cause(exc)
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}".rstrip(": ")


# ----------------------------------------------------------------------------- manager


class CheckpointManager:
    """Save/verify/list/resolve/load checkpoints under `root/checkpoints/`.

    `keep_last`: how many complete checkpoints to keep (None keeps all). `verify`: how much
    integrity data the manifest carries and how hard `verify()` checks it -- "sha256" (size and
    content hash; reads every byte), "size", or "none" (files must merely exist).
    """

    def __init__(self, root: str | Path, keep_last: int | None = 3, *, verify: VerifyMode = "sha256") -> None:
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
            raise TunesmithError(f"checkpoint keep_last must be a positive integer or null, got {keep_last!r}")
        if verify not in _VERIFY_MODES:
            raise TunesmithError(f"checkpoint verify must be one of {', '.join(_VERIFY_MODES)}, got {verify!r}")
        self.root = Path(root)
        self.dir = self.root / "checkpoints"
        self.keep_last = keep_last
        self.verify_mode: VerifyMode = verify

    # ------------------------------------------------------------------ naming / listing

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}"

    @staticmethod
    def step_of(path: str | Path) -> int | None:
        m = _STEP_RE.match(Path(path).name)
        return int(m.group(1)) if m else None

    def list_complete(self) -> list[Path]:
        """Checkpoint dirs that have a manifest (written last), oldest step first. Not hashed."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and self.step_of(p) is not None and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda p: self.step_of(p) or 0)

    def cleanup_partial(self) -> list[Path]:
        """Remove `.tmp-*` leftovers of crashed saves; call once at start-up.

        Not done implicitly: another process (an eval job) opening the same root must not
        delete a save that training has in flight.
        """
        removed: list[Path] = []
        if _is_rank0() and self.dir.is_dir():
            for p in sorted(self.dir.glob(f"{_TMP_PREFIX}*")):
                log.warning("removing partial checkpoint %s left by an interrupted save", p)
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        _barrier()
        return removed

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        app_state: Mapping[str, Stateful],
        *,
        config: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        extra_files: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write `app_state` as checkpoint `step` atomically; then prune beyond keep_last.

        `extra_files(tmp_dir)` runs on rank 0 after the DCP shards are written and before the
        manifest, so whatever it writes (an HF config.json, tokenizer files) is listed and
        verified like the shards. Write into subdirectories: DCP owns the top-level names.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TunesmithError(f"checkpoint step must be a non-negative integer, got {step!r}")
        plain_config = plain(dict(config), "config") if config is not None else None
        plain_meta = plain(dict(meta), "meta") if meta is not None else {}
        state = {key: obj.state_dict() for key, obj in app_state.items()}
        tmp = self._make_tmp(step)
        try:
            with _quiet_single_process():
                dcp.save(state, checkpoint_id=tmp)
        except BaseException as e:
            # Left in place on purpose: other ranks may still be writing into it, and
            # cleanup_partial() at the next start removes it safely.
            log.warning("checkpoint save for step %d failed; partial files left in %s", step, tmp)
            if isinstance(_root_cause(e), OSError):  # disk full, permissions: the user's to fix
                raise TunesmithError(f"could not write checkpoint {tmp}: {_dcp_reason(e)}") from e
            raise
        error: str | None = None
        final = self.step_dir(step)
        failure: Exception | None = None
        if _is_rank0():
            try:
                if extra_files is not None:
                    extra_files(tmp)
                self._finalize(tmp, final, step, plain_config, plain_meta)
            except Exception as e:  # noqa: BLE001 -- broadcast first so no rank hangs
                failure = e
                error = f"could not finalize checkpoint {final}: {_dcp_reason(e)}"
        error = _from_rank0(error)
        _barrier()
        if failure is not None and not isinstance(failure, OSError):
            raise failure  # a bug, not the user's disk: keep its traceback
        if error:
            raise TunesmithError(error)
        if _is_rank0():
            self._prune(keep=final)
        _barrier()
        return final

    def _make_tmp(self, step: int) -> Path:
        # One name for all ranks: each rank writes its shard into the same directory.
        name = _from_rank0(f"{_TMP_PREFIX}step_{step:08d}-{uuid.uuid4().hex[:12]}")
        tmp = self.dir / name
        error: str | None = None
        if _is_rank0():
            try:
                tmp.mkdir(parents=True)
            except OSError as e:
                error = f"cannot create checkpoint directory {tmp}: {e.strerror or e}"
        error = _from_rank0(error)
        if error:
            raise TunesmithError(error)
        _barrier()
        return tmp

    def _finalize(self, tmp: Path, final: Path, step: int, config: Any, meta: Any) -> None:
        if config is not None:
            write_durable(tmp / CONFIG, yaml.safe_dump(config, sort_keys=False))
        world = dist.get_world_size() if _distributed() else 1
        manifest = build_manifest(tmp, step, meta, self.verify_mode, world)
        write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1))
        fsync_dir(tmp)
        if final.exists():
            # Re-saving a step: move the old one aside under a .tmp name (so a crash here
            # leaves cleanable debris), swap, then delete it.
            aside = self.dir / f"{_TMP_PREFIX}replaced-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.dir)

    def _prune(self, keep: Path) -> None:
        if self.keep_last is None:
            return
        complete = self.list_complete()
        # Never the checkpoint just written, even if stale higher-step ones exist.
        doomed = [p for p in complete[: max(0, len(complete) - self.keep_last)] if p != keep]
        for p in doomed:
            try:
                # Rename first so a crash mid-delete cannot leave a half-deleted "checkpoint".
                trash = self.dir / f"{_TMP_PREFIX}deleting-{p.name}-{uuid.uuid4().hex[:8]}"
                os.replace(p, trash)
                shutil.rmtree(trash)
            except OSError as e:
                log.warning("could not delete old checkpoint %s: %s", p, e.strerror or e)

    # ------------------------------------------------------------------ verify / resolve

    @classmethod
    def read_manifest(cls, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        manifest, reason = manifest_or_reason(path)
        if manifest is None:
            raise TunesmithError(f"{path} is not a usable checkpoint: {reason}")
        return manifest

    def verify(self, path: str | Path) -> str | None:
        """None when the checkpoint at `path` is intact, else the reason it is not."""
        path = Path(path)
        if not path.is_dir():
            return "not a directory"
        manifest, reason = manifest_or_reason(path)
        if manifest is None:
            return reason
        for entry in manifest["files"]:
            reason = check_file(path, entry, self.verify_mode)
            if reason:
                return reason
        return None

    def latest_complete(self) -> Path | None:
        """Newest checkpoint that passes `verify()`; invalid ones are skipped with a warning."""
        for path in reversed(self.list_complete()):
            reason = self.verify(path)
            if reason is None:
                return path
            log.warning("skipping checkpoint %s: %s", path, reason)
        return None

    def resolve(self, resume: str | int | Path) -> Path | None:
        """`"auto"` -> latest valid (None if none); `"200"`/200 -> that step; else a path."""
        text = str(resume).strip()
        if text.lower() == "auto":
            return self.latest_complete()
        if text.isdigit():
            path = self.step_dir(int(text))
            if not path.is_dir():
                have = ", ".join(str(self.step_of(p)) for p in self.list_complete()) or "none"
                raise TunesmithError(f"no checkpoint for step {int(text)} under {self.dir} (available steps: {have})")
        else:
            path = Path(text).expanduser()
            if not path.exists():
                raise TunesmithError(f"resume checkpoint {path} does not exist")
        reason = self.verify(path)
        if reason is not None:
            raise TunesmithError(f"cannot resume from {path}: {reason}")
        return path

    # ------------------------------------------------------------------ load

    def load(self, path: str | Path, app_state: Mapping[str, Stateful]) -> dict[str, Any]:
        """Load checkpoint `path` into every object of `app_state`; returns its manifest.

        Integrity is checked by `resolve()`/`verify()`, not here (hashing twice is costly);
        DCP itself has no checksums, so an unverified flipped byte loads silently.
        """
        path = Path(path)
        manifest = self.read_manifest(path)
        state = {key: obj.state_dict() for key, obj in app_state.items()}
        try:
            with _quiet_single_process():
                dcp.load(state, checkpoint_id=path)
        except (CheckpointException, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
            raise TunesmithError(f"could not load checkpoint {path}: {_dcp_reason(e)}") from e
        for key, obj in app_state.items():
            try:
                obj.load_state_dict(state[key])
            except TunesmithError as e:
                raise TunesmithError(f"could not restore '{key}' from checkpoint {path}: {e}") from e
            except (RuntimeError, ValueError, KeyError) as e:
                raise TunesmithError(f"could not restore '{key}' from checkpoint {path}: {_dcp_reason(e)}") from e
        return manifest

    read_config = staticmethod(read_config)  # the run config saved with a checkpoint ({} if none)
