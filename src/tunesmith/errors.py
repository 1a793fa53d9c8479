"""User-facing errors.

A `TunesmithError` is bad input or an impossible request: the CLI prints its message as one
line and exits with code 2 (no traceback unless `--debug`). Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import re


class TunesmithError(Exception):
    """Bad input or impossible configuration; message is one clear line saying what and where."""

    exit_code = 2


class ConfigError(TunesmithError):
    """A recipe or override that does not validate: unknown key, wrong type, impossible mix."""


class NonFiniteError(TunesmithError):
    """Training hit a non-finite loss or gradient norm and stopped (exit code 3)."""

    exit_code = 3


# ESC [ ... letter: terminal styling (torch bolds parts of its weights-only refusal).
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, without terminal escape codes.

    For embedding a library's error in our one-line message: their messages can run over many
    lines and carry ANSI codes that show up as `[1m` garbage when output is not a terminal.
    """
    for line in _ANSI_RE.sub("", str(exc)).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
