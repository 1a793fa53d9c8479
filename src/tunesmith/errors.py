"""User-facing errors.

A `TunesmithError` is bad input or an impossible request: the CLI prints its message as one
line and exits with code 2 (no traceback unless `--debug`). Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class TunesmithError(Exception):
    """Bad input or impossible configuration; message is one clear line saying what and where."""

    exit_code = 2


class ConfigError(TunesmithError):
    """A recipe or override that does not validate: unknown key, wrong type, impossible mix."""


class NonFiniteError(TunesmithError):
    """Training hit a non-finite loss or gradient norm and stopped (exit code 3)."""

    exit_code = 3
