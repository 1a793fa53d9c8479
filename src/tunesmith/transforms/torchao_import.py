"""Import a torchao module for one feature, with one clear error when it is missing.

torchao is optional (extras `lowmem` / `qlora`). On a machine without its CUDA extensions it logs
a warning per extension it cannot load; the features here need none of them at import time, so
those lines are kept out of the user's log.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from tunesmith.errors import TunesmithError

MIN_TORCHAO = "0.12"


def import_torchao(module: str, feature: str, needs: tuple[str, ...] = ()) -> ModuleType:
    """`module` (e.g. "torchao.float8"), checked to define every name in `needs`."""
    ao_log = logging.getLogger("torchao")
    level = ao_log.level
    ao_log.setLevel(logging.ERROR)
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 -- not installed, or built for another torch
        first = str(e).splitlines()[0] if str(e) else ""
        raise TunesmithError(
            f"{feature} needs torchao>={MIN_TORCHAO} (pip install 'tunesmith[lowmem]'): "
            f"{type(e).__name__}: {first}"
        ) from None
    finally:
        ao_log.setLevel(level)
    missing = [n for n in needs if not hasattr(mod, n)]
    if missing:
        raise TunesmithError(
            f"{feature} needs torchao>={MIN_TORCHAO}; the installed {module} has no {', '.join(missing)}"
        )
    return mod
