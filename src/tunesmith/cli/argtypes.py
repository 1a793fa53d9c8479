"""argparse value types that check flags the way the config checks its fields.

A bad value ends in argparse's own error (usage line plus one `error:` line naming the flag,
exit code 2) before anything is loaded, instead of a traceback or a silently used default.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return check


positive_int = _int_at_least(1)  # sizes, counts, steps
nonneg_int = _int_at_least(0)  # seeds, restart counts, ranks


def nonneg_float(text: str) -> float:
    """A finite number >= 0 (temperatures)."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def nonempty(text: str) -> str:
    """A string with something in it (column names, prompts, paths)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def byte_size(text: str) -> str:
    """A size such as 5GB, 500MB or 2GiB, checked now and passed on as written."""
    from tunesmith.checkpoint.export import parse_size
    from tunesmith.errors import TunesmithError

    try:
        size = parse_size(text)
    except TunesmithError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return text


_DTYPE_SPELLINGS = (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16"))


def dtype_spelling(short: bool) -> Callable[[str], str]:
    """export spells dtypes as torch does (bfloat16), merge and --precision as the config does
    (bf16): each takes the other spelling too, turned into its own; anything else is passed on
    unchanged for argparse's `choices` to refuse."""
    def convert(text: str) -> str:
        for long, brief in _DTYPE_SPELLINGS:
            if text.lower() in (long, brief):
                return brief if short else long
        return text

    return convert
