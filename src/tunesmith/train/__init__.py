"""The training engine: setup (building a Trainer from a RunConfig) and the loop.

`tunesmith.train` is also the notebook entry point `tunesmith.train(recipe, **overrides)`:
this package and that function share one name, and Python binds the name `train` on the
`tunesmith` package to this module as soon as any `tunesmith.train.*` module is imported, so
the module itself is made callable (calling it runs `tunesmith.api.train`).
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, recipe: Any = None, **overrides: Any) -> dict[str, Any]:
        """Run a whole training job like `tunesmith train`; see `tunesmith.api.train`."""
        from tunesmith.api import train

        return train(recipe, **overrides)


sys.modules[__name__].__class__ = _CallableModule
