"""A `RunConfig` from Python values: a recipe path, dict or RunConfig, plus keyword overrides.

The notebook-side counterpart of `load_config` (which takes `key=value` strings from a command
line); used by `tunesmith.train`, `Trainer.from_config` and the front-ends' API users.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tunesmith.config.loader import format_validation_error, read_yaml, resolve_paths
from tunesmith.config.schema import RunConfig
from tunesmith.errors import ConfigError


def _merge(base: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` ("optim.lr", "optim__lr" or a section "optim" with a dict) in `base`."""
    parts = key.replace("__", ".").split(".")
    node = base
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    leaf = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        for sub, v in value.items():
            _merge(node[leaf], sub, v)
    else:
        node[leaf] = value


def build_config(recipe: Any = None, **overrides: Any) -> RunConfig:
    """A validated `RunConfig` from a recipe (YAML path, dict or RunConfig) plus overrides.

    Overrides are keyword arguments: a section with a dict (`optim={"lr": 3e-4}`, merged
    into the recipe's section), or one key spelled `optim__lr=3e-4` (or `**{"optim.lr": 3e-4}`).
    Raises `ConfigError` naming the key (with the closest valid one for a typo).
    Paths resolve as with `load_config`: a YAML recipe's against its own folder, the rest
    (dicts, overrides, defaults) against the working directory.
    """
    if isinstance(recipe, RunConfig):
        data, source = recipe.model_dump(mode="json"), "RunConfig"
    elif isinstance(recipe, dict):
        data, source = copy.deepcopy(recipe), "recipe dict"
    elif isinstance(recipe, (str, Path)):
        data, source = read_yaml(recipe), str(recipe)
        resolve_paths(data, Path(recipe).resolve().parent, fallback=Path.cwd())
    elif recipe is None:
        data, source = {}, "overrides"
    else:
        raise ConfigError(f"recipe must be a YAML path, a dict or a RunConfig, got "
                          f"{type(recipe).__name__}")
    for key, value in overrides.items():
        _merge(data, key, value)
    resolve_paths(data, Path.cwd())
    overridden = [] if recipe is None else [
        f"{key.replace('__', '.')}.{sub}" if isinstance(value, dict) else key.replace("__", ".")
        for key, value in overrides.items() for sub in (value if isinstance(value, dict) else [""])]
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, overridden, by="keyword")) from None
    cfg.output.dir = str(Path(cfg.output.dir).expanduser().resolve())  # also the default
    return cfg
