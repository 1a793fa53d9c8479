"""tunesmith: fine-tune and pre-train language models on PyTorch's own engine.

The Python API (for notebooks) is loaded on first use, so `import tunesmith` stays light:

    tunesmith.train(recipe_or_dict, **overrides) -> summary dict
    tunesmith.Trainer.from_config(recipe_or_dict, **overrides) -> Trainer (call .train())
    tunesmith.load_model(path_or_preset) / tunesmith.load_tokenizer(path)
    tunesmith.build_config(recipe_or_dict, **overrides) -> RunConfig
    tunesmith.errors.TunesmithError (and ConfigError, NonFiniteError) on bad input
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# None: a submodule. `tunesmith.train` is the training package, made callable so that
# `tunesmith.train(recipe, **overrides)` runs `tunesmith.api.train` (see train/__init__.py).
_LAZY = {
    "train": None, "load_model": "tunesmith.api", "load_tokenizer": "tunesmith.api",
    "build_config": "tunesmith.config.resolve", "RunConfig": "tunesmith.config.schema",
    "Trainer": "tunesmith.train.trainer", "errors": None,
}
__all__ = ["RunConfig", "Trainer", "__version__", "build_config", "errors", "load_model",
           "load_tokenizer", "train"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
    module = _LAZY[name]
    if module is None:
        return importlib.import_module(f"tunesmith.{name}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
