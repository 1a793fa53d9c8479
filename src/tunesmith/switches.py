"""Environment switches that pin a kernel path for A/B runs, read in one place.

Each switch names a Triton kernel's fallback (the code path it replaced), so a benchmark can
compare the two in one process setup. `resolve_runtime` checks them all at setup, so a typo
fails in one line before any work, not at the first loss or dequantisation.
"""

from __future__ import annotations

import os

from tunesmith.errors import TunesmithError

# name -> allowed values, the default first
SWITCHES: dict[str, tuple[str, ...]] = {
    "TUNESMITH_CE": ("auto", "triton", "inductor"),  # objective/ce_kernel.py vs the compiled expression
    "TUNESMITH_NF4": ("kernel", "compiled"),  # peft/nf4_kernel.py vs the compiled expression
}


def switch(name: str) -> str:
    """The switch's value from the environment (its default when unset)."""
    allowed = SWITCHES[name]
    value = os.environ.get(name, allowed[0])
    if value not in allowed:
        raise TunesmithError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
    return value


def check_switches() -> None:
    for name in SWITCHES:
        switch(name)
