"""The recipe a front-end builds from flags, and running it.

A front-end never calls the engine with its own flags: it fills a nested dict of tunesmith
recipe keys (`Recipe.set("optim.lr", 5e-5)`), validates it into the one typed `RunConfig`,
prints it (so users can switch to `tunesmith train RECIPE`), and hands the `RunConfig` to the
same `run_training` that `tunesmith train` uses; under torchrun that trains distributed.
Flags that need nothing on CUDA, or that tunesmith does differently, leave a one-line note.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.frontends.flags import Flag

# Top-level order of a printed recipe (RunConfig's field order, spelled out to keep this
# module import-light: the schema pulls in pydantic models only, but the order is the point).
_SECTION_ORDER = ("task", "model", "data", "sft", "mlm", "optim", "schedule", "train", "eval",
                  "logging", "profile", "output", "checkpoint", "parallel", "peft")

# Flags every front-end takes besides its tool's own.
COMMON_FLAGS = [
    Flag("print-recipe", "opt", None, "write the recipe as YAML (to FILE, or stdout) and exit",
         aliases=("print_recipe",)),
    Flag("debug", bool, False, "show tracebacks for errors"),
]


def local_path(text: str) -> str:
    """An existing local path made absolute (recipes may later be read from elsewhere);
    symlinks are kept as written."""
    p = Path(text).expanduser()
    return os.path.abspath(p) if p.exists() else text


def out_path(text: str) -> str:
    """An output location made absolute, whether or not it exists yet."""
    return os.path.abspath(Path(text).expanduser())


@dataclass
class EvalOnly:
    """`--do_eval` without `--do_train`: `tunesmith eval` on a model and a validation file."""

    model: str
    data: str
    block_size: int | None
    batch_size: int
    precision: str
    device: str = "auto"
    max_batches: int | None = None

    def command(self) -> str:
        args = ["tunesmith", "eval", self.model, "--data", self.data, "--batch-size",
                str(self.batch_size), "--precision", self.precision, "--device", self.device]
        if self.block_size:
            args += ["--block-size", str(self.block_size)]
        if self.max_batches:
            args += ["--max-batches", str(self.max_batches)]
        return shlex.join(args)


@dataclass
class Recipe:
    """Keys set by a front-end, notes about flags, and (rarely) an evaluation-only plan."""

    frontend: str
    argv: list[str]
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    eval_only: EvalOnly | None = None

    def set(self, key: str, value: Any) -> None:
        *sections, leaf = key.split(".")
        node = self.data
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = value

    def get(self, key: str, default: Any = None) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def note(self, flag: str, text: str) -> None:
        line = f"{flag}: {text}"
        if line not in self.notes:
            self.notes.append(line)

    def ordered(self) -> dict[str, Any]:
        rank = {s: i for i, s in enumerate(_SECTION_ORDER)}
        return dict(sorted(self.data.items(), key=lambda kv: rank.get(kv[0], len(rank))))

    def config(self):  # -> RunConfig
        """Validate into the typed `RunConfig`; a problem is one line naming the key."""
        from tunesmith.config.loader import format_validation_error
        from tunesmith.config.schema import RunConfig

        try:
            return RunConfig.model_validate(self.ordered())
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"the recipe built by tunesmith "
                                                            f"{self.frontend}")) from None

    def to_yaml(self) -> str:
        head = [f"# tunesmith recipe built by: tunesmith {self.frontend} {shlex.join(self.argv)}",
                "# run it with: tunesmith train THIS_FILE  (key=value overrides work as usual)"]
        head += [f"# note: {n}" for n in self.notes]
        return "\n".join(head) + "\n" + dump_recipe(self.ordered())


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...")


def dump_recipe(data: dict[str, Any]) -> str:
    """YAML with one block per section and each value on one line (lists/maps in flow style),
    the layout of the recipes in recipes/."""
    lines = []
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key}: {_flow(value)}")
            continue
        lines.append(f"{key}:")
        lines += [f"  {sub}: {_flow(v)}" for sub, v in value.items()]
    return "\n".join(lines) + "\n"


def _is_main_rank() -> bool:
    from tunesmith.cli.dist import is_main_rank

    return is_main_rank()


def execute(recipe: Recipe, print_recipe: str | bool | None) -> int:
    """Print or write the recipe; unless only printing, run it like `tunesmith train`."""
    if recipe.eval_only is not None:
        return _execute_eval(recipe, print_recipe)
    cfg = recipe.config()  # validated before anything is printed or run
    text = recipe.to_yaml()
    if _print_only(print_recipe, text):
        return 0
    if _is_main_rank():
        print(f"tunesmith {recipe.frontend}: running this recipe (save it with --print-recipe "
              "FILE, then use tunesmith train FILE):", file=sys.stderr)
        print(text, file=sys.stderr, end="")
    from tunesmith.train.setup import run_training

    summary = run_training(cfg)
    if not _is_main_rank():
        return 0
    print(json.dumps(summary, indent=2))
    if summary.get("interrupted"):
        print(f"tunesmith: training stopped at step {summary['steps']}; resume with the same "
              "command plus --resume_from_checkpoint auto", file=sys.stderr)
    return 0


def _print_only(print_recipe: str | bool | None, text: str) -> bool:
    """--print-recipe: write `text` to stdout (bare flag) or to its FILE; True when it was asked."""
    if not print_recipe:
        return False
    if print_recipe is True:
        sys.stdout.write(text)
    else:
        _write(Path(print_recipe), text)
    return True


def _execute_eval(recipe: Recipe, print_recipe: str | bool | None) -> int:
    plan = recipe.eval_only
    assert plan is not None
    text = "\n".join(f"# note: {n}" for n in recipe.notes) + ("\n" if recipe.notes else "")
    text += plan.command() + "\n"
    if _print_only(print_recipe, text):
        return 0
    print(f"tunesmith {recipe.frontend}: evaluation only, as:\n{text}", file=sys.stderr, end="")
    from tunesmith.eval.run import run_eval

    out = run_eval(plan.model, plan.data, block_size=plan.block_size, batch_size=plan.batch_size,
                   device=plan.device, precision=plan.precision, max_batches=plan.max_batches)
    print(json.dumps(out))
    return 0


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise TunesmithError(f"--print-recipe: cannot write {path}: {e.strerror or e}") from None
    print(f"tunesmith: recipe written to {path}", file=sys.stderr)
