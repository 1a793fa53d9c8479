"""User-facing errors.

A `TunesmithError` is bad input or an impossible request: the CLI prints its message as one
line and exits with code 2 (no traceback unless `--debug`). Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class TunesmithError(Exception):
    """Bad input or impossible configuration; message is one clear line saying what and where."""

    exit_code = 2
