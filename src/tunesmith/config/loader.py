"""Load a recipe: YAML file + dotted `key=value` overrides -> validated `RunConfig`.

Every failure is a `TunesmithError` whose one-line message says what and where: the YAML
line:column, the unknown key and its closest valid spelling, or the field with the wrong type.
"""

from __future__ import annotations

import difflib
import logging
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunesmith.config.schema import RunConfig
from tunesmith.errors import ConfigError, TunesmithError

log = logging.getLogger("tunesmith")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice (plain YAML keeps the last silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(
                f"duplicate key {key!r} in {loader.name}: line {seen[key]} and line {line} "
                "(the second would silently replace the first)"
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping, turning every failure into one clear line."""
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"recipe not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TunesmithError(f"recipe {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise TunesmithError(f"cannot read recipe {path}: {e.strerror}") from None
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TunesmithError(f"invalid YAML at {where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TunesmithError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 0.0003). Values are parsed as YAML scalars/lists."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise TunesmithError(f"override {item!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # an unparseable value is taken literally, as a string
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise TunesmithError(f"override {item!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def _valid_keys(model: type[BaseModel], prefix: tuple[str, ...]) -> list[str]:
    """All dotted keys valid under `prefix` (sections are walked, leaves listed)."""
    node: Any = model
    for part in prefix:
        field = node.model_fields.get(part) if isinstance(node, type) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        node = ann
    return list(node.model_fields)


def _blame(source: str, first: str, overridden: Collection[str], by: str) -> str:
    """Where the first problem's key came from: a recipe file, an override, or both (a
    whole-config check such as warmup_steps vs max_steps, with an override in play)."""
    if not overridden:
        return source
    if first and any(first == k or first.startswith(k + ".") for k in overridden):
        return f"{by} override"
    if not first or any(k.startswith(first + ".") for k in overridden):
        return f"{source} + {by} overrides"
    return source


def format_validation_error(err: ValidationError, source: str, overridden: Collection[str] = (),
                            by: str = "command-line") -> str:
    """One line for the first problem (plus a count of the rest). `overridden`: the dotted keys
    set by overrides (`by` says whose), so a bad `optim.lr=abc` typed on the command line is not
    blamed on the recipe file."""
    problems = []
    first = ".".join(str(p) for p in err.errors()[0]["loc"]) if err.errors() else ""
    source = _blame(source, first, overridden, by)
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        dotted = ".".join(loc)
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(RunConfig, loc[:-1])
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f" (did you mean {'.'.join(loc[:-1] + (close[0],))!r}?)" if close else ""
            where = ".".join(loc[:-1]) or "top level"
            problems.append(f"unknown key {dotted!r}{hint}; valid keys in {where}: {', '.join(valid)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = f" (got {e['input']!r})" if dotted and not isinstance(e["input"], dict) else ""
            problems.append(f"{dotted}: {msg}{got}" if dotted else msg)
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"invalid config in {source}: {problems[0]}{more}"


# Config keys that hold filesystem paths. Those in _ALWAYS_PATHS are paths whatever they say;
# the others may also name a preset, a hub model or a hub dataset, so they count as paths only
# when they exist on disk or are spelled like one (./x, ../x).
_ALWAYS_PATHS = ("data.cache_dir", "output.dir", "profile.dir", "peft.from_checkpoint",
                 "parallel.deepspeed_config", "checkpoint.resume")
_MAYBE_PATHS = ("model.name", "model.tokenizer", "data.path", "data.validation_path")


def _resolve_one(key: str, value: str, base: Path, fallback: Path | None) -> str:
    if key == "checkpoint.resume" and (value.strip().lower() == "auto" or value.strip().isdigit()):
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    here = (base / path).resolve()
    if key in _ALWAYS_PATHS or here.exists() or value.startswith(("./", "../")):
        if fallback is not None and not here.exists() and (fallback / path).exists():
            # Recipes written before paths were recipe-relative: keep them working, say so.
            log.warning("%s=%s: not found next to the recipe (%s) but found from the working "
                        "directory; recipe paths are relative to the recipe's folder, please "
                        "update the recipe", key, value, here)
            return str((fallback / path).resolve())
        return str(here)
    return value  # a preset, hub id or dataset name


def resolve_paths(data: dict[str, Any], base: Path, fallback: Path | None = None) -> dict[str, Any]:
    """Make the relative paths of a raw config absolute against `base` (in place).

    Recipe files resolve against their own folder, command-line overrides against the working
    directory, so `OUTPUT/config.yaml` records absolute paths and a recipe works from any cwd.
    """
    for key in (*_ALWAYS_PATHS, *_MAYBE_PATHS):
        section, name = key.split(".")
        body = data.get(section)
        value = body.get(name) if isinstance(body, dict) else None
        if isinstance(value, str) and value.strip():
            body[name] = _resolve_one(key, value, base, fallback)
    return data


def load_config(recipe: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe (or start from defaults when None), apply overrides, validate.

    Relative paths in the recipe are relative to the recipe's folder; those given as overrides
    (and defaults such as output.dir) to the working directory.
    """
    cwd = Path.cwd()
    data = read_yaml(recipe) if recipe is not None else {}
    if recipe is not None:
        resolve_paths(data, Path(recipe).resolve().parent, fallback=cwd)
    data = apply_overrides(data, list(overrides or []))
    resolve_paths(data, cwd)
    source = str(recipe) if recipe is not None else "command line"
    # with a recipe, say whether a bad key came from it or from an override
    overridden = [".".join(parse_override(item)[0]) for item in overrides or []] if recipe else []
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, overridden)) from None
    cfg.output.dir = str((cwd / Path(cfg.output.dir).expanduser()).resolve())  # also the default
    return cfg


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config so a run can be reproduced from its output directory."""
    Path(path).write_text(
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
    )


def _type_name(ann: Any) -> str:
    """`Literal['a', 'b'] | None` -> `a|b|None`; plain classes by name."""
    args = typing.get_args(ann)
    if typing.get_origin(ann) is typing.Literal:
        return "|".join(str(a) for a in args)
    if args and typing.get_origin(ann) in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in args)
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def describe_options(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Lines `key (type, default): description` for every option, for `train --help`."""
    lines: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        key = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(describe_options(ann, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        tname = _type_name(ann)
        desc = f": {field.description}" if field.description else ""
        lines.append(f"  {key} ({tname}, default {default!r}){desc}")
    return lines


def reference_markdown() -> str:
    """docs/config.md: every option, grouped by section (kept in sync by a test)."""
    out = ["# Config reference", "",
           "Generated from `tunesmith/config/schema.py` by "
           "`python -m tunesmith.config.loader > docs/config.md`. Every key can be set in a "
           "recipe's YAML section or on the command line as `section.key=value`. Relative paths in "
           "a recipe are relative to the recipe's folder, those on the command line to the "
           "working directory; `OUTPUT/config.yaml` holds them resolved (absolute). Numbers "
           "must be finite (`inf` and `nan` are refused); the `dpo:` section applies to "
           "`task: dpo` only (a changed dpo key under another task is refused).", ""]
    section = None
    for line in describe_options():
        key = line.strip().split(" ", 1)[0]
        head = key.split(".")[0] if "." in key else "(top level)"
        if head != section:
            section = head
            out += ["", f"## {section}", ""]
        out.append(f"- `{key}` {line.strip()[len(key):].strip()}")
    return "\n".join(out).strip() + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
