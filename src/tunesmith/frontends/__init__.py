"""Front-ends: other tools' command lines, translated into one tunesmith recipe and run.

    tunesmith run_clm ...        Hugging Face / optimum-habana run_clm.py flags
    tunesmith run_mlm ...        run_mlm.py flags
    tunesmith run_lora_clm ...   optimum-habana run_lora_clm.py flags
    tunesmith llama-recipes ...  llama-recipes' finetuning config fields

A front-end only translates: its flags become keys of the typed `RunConfig` (printed as a
YAML recipe; `--print-recipe [FILE]` writes it and exits), and the engine runs that config
exactly as `tunesmith train` would, distributed under torchrun. Unknown flags are an error
naming the closest known one. docs/migrating.md has the flag -> key tables.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

HF_SCRIPTS = ("run_clm", "run_mlm", "run_lora_clm")
FRONTENDS = (*HF_SCRIPTS, "llama-recipes")

_HELP = {
    "run_clm": "train a causal LM with Hugging Face run_clm.py's flags",
    "run_mlm": "train a masked LM with Hugging Face run_mlm.py's flags",
    "run_lora_clm": "LoRA fine-tuning with optimum-habana run_lora_clm.py's flags",
    "llama-recipes": "fine-tune with llama-recipes' training config fields as flags",
}


def _builder(name: str) -> Callable:
    if name == "llama-recipes":
        from tunesmith.frontends.llama_recipes import build_recipe, parser
    else:
        from tunesmith.frontends.hf_scripts import build_recipe, parser
    return build_recipe, parser


def run_frontend(name: str, argv: list[str], args: argparse.Namespace | None = None) -> int:
    """Translate `argv` (the tool's flags) and run, or print the recipe. Returns the exit code."""
    from tunesmith.frontends.recipe import execute

    build_recipe, parser = _builder(name)
    if any(a in ("-h", "--help") for a in argv):
        header = f"tunesmith {name}: {_HELP[name]}. Each flag maps onto a recipe key."
        print(parser(name).help_text(header))
        return 0
    if "--debug" in argv and args is not None:
        args.debug = True  # the CLI's error handler reads it
    recipe, flags = build_recipe(name, argv)
    return execute(recipe, flags["print-recipe"])


def add_frontend_commands(sub: argparse._SubParsersAction) -> None:
    """Register the front-ends as subcommands; their flags reach `run_frontend` unparsed."""
    for name in FRONTENDS:
        p = sub.add_parser(name, help=_HELP[name], add_help=False)
        p.set_defaults(func=lambda a, n=name: run_frontend(n, a.flags, a), takes_flags=True)


__all__ = ["FRONTENDS", "add_frontend_commands", "run_frontend"]
