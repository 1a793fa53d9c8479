"""One output file written atomically, with a path that cannot be a file as one clear error.

The report, generation predictions and lm-eval results each write one file named by the user
(`--out`, `--output`): through `NAME.tmp` and a rename, so a crash never leaves half a file.
A directory there, or a parent that is a file, is a `TunesmithError` naming the path (exit 2
at the CLI) with no `.tmp` left behind, instead of an OSError traceback.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import TunesmithError


def os_error_reason(e: OSError) -> str:
    """`File exists: /path` rather than `[Errno 17] ...`: what went wrong and on which path."""
    return f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)


def check_file_target(path: str | Path, what: str, example: str) -> Path:
    """`path` as a file to write, refused now (before any work) when it is a directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise TunesmithError(f"{what} {path} is a directory; give a file name, e.g. "
                             f"{path / example}")
    return path


def replace_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `NAME.tmp` and a rename: a reader or a crash never
    sees half a file, and a failed write leaves no NAME.tmp. No user-path checks: for files in
    a directory the run owns, and for `write_text_atomic`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError:  # no half-written NAME.tmp left behind
        if tmp.is_file():
            tmp.unlink()
        raise


def write_text_atomic(path: str | Path, text: str, what: str, example: str) -> Path:
    """Write `text` to `path` (UTF-8) atomically; `what` names the flag or file in errors and
    `example` is a file name to suggest inside a directory."""
    path = check_file_target(path, what, example)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, text)
    except OSError as e:  # read-only or full disk, a file where a folder should be, ...
        raise TunesmithError(f"cannot write {what} {path} ({os_error_reason(e)})") from None
    return path
