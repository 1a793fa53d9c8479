"""`tunesmith` command line: train, launch, eval, generate, export, merge, demo, report.

User errors (`TunesmithError`, bad config/data) print one line and exit 2 (a NaN halt exits 3);
`--debug` shows the traceback. Every subcommand is a thin shell over library functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import typing
from collections.abc import Callable
from pathlib import Path

from tunesmith.cli.argtypes import (
    byte_size,
    dtype_spelling,
    nonempty,
    nonneg_float,
    nonneg_int,
    positive_int,
)
from tunesmith.cli.data_inspect import add_data_command
from tunesmith.cli.dist import add_launch_command, is_main_rank, report_error, run_worker
from tunesmith.cli.report import add_report_command
from tunesmith.config.schema import PRECISIONS
from tunesmith.config.tasks import SFT_FORMATS
from tunesmith.cpu import apply_process_defaults
from tunesmith.errors import TunesmithError
from tunesmith.frontends import add_frontend_commands

log = logging.getLogger("tunesmith")


def _train(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config
    from tunesmith.train.setup import run_training

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is None:
        raise TunesmithError(
            "train needs a recipe file, section.key=value overrides, or both, e.g. "
            "`tunesmith train recipes/llama_clm_shakespeare.yaml`; every option: "
            "tunesmith train --help")
    if "=" in recipe and not Path(recipe).exists():
        # No recipe file: everything comes from key=value overrides.
        recipe, overrides = None, [recipe, *overrides]
    cfg = load_config(recipe, overrides)
    summary = run_training(cfg)
    if not is_main_rank():
        return 0
    print(json.dumps(summary, indent=2))
    if summary.get("interrupted"):
        print(_resume_hint(recipe, overrides, summary), file=sys.stderr)
    return 0


def _resume_hint(recipe: str | None, overrides: list[str], summary: dict) -> str:
    """How to continue a preempted run: the same command plus checkpoint.resume=auto."""
    kept = [o for o in overrides if not o.startswith("checkpoint.resume=")]
    command = shlex.join(["tunesmith", "train", *([recipe] if recipe else []), *kept,
                          "checkpoint.resume=auto"])
    where = summary.get("checkpoint")
    saved = f"checkpoint saved to {where}" if where else "no checkpoint was saved"
    return (f"tunesmith: training stopped by {summary.get('stopped_by', 'a signal')} at step "
            f"{summary['steps']}; {saved}. Resume with: {command}")


def _export(args: argparse.Namespace) -> int:
    from tunesmith.checkpoint.export import export_hf

    out = export_hf(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                    allow_pickle=args.allow_unsafe_pickle)
    print(json.dumps({"exported": str(out), "format": args.format}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from tunesmith.eval.run import run_eval

    if args.harness is not None:
        return _eval_harness(args)
    if args.data is None:
        raise TunesmithError("eval needs --data FILE (perplexity, or --generate), or --harness TASKS")
    if args.generate:
        return _eval_generate(args)
    out = run_eval(
        args.model, args.data, block_size=args.block_size, batch_size=args.batch_size,
        device=args.device, precision=args.precision, text_column=args.text_column,
        max_batches=args.max_batches,
    )
    print(json.dumps(out))
    return 0


def _eval_generate(args: argparse.Namespace) -> int:
    from tunesmith.config.tasks import SFTConfig
    from tunesmith.eval.run import run_generate_eval
    from tunesmith.hf.files import check_file_target

    if args.output:  # refused before the model is loaded and every prompt answered
        check_file_target(args.output, "--output", "predictions.jsonl")
    sft = SFTConfig()
    if args.recipe:
        from pydantic import ValidationError

        from tunesmith.config.loader import read_yaml

        try:
            sft = SFTConfig.model_validate(read_yaml(args.recipe).get("sft") or {})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise TunesmithError(f"invalid sft section in {args.recipe}: {where}: "
                                 f"{first['msg']}") from None
    if args.format:
        sft = sft.model_copy(update={"format": args.format})
    if args.chat_template:
        sft = sft.model_copy(update={"chat_template": args.chat_template})
    out = run_generate_eval(
        args.model, args.data, sft=sft, max_new_tokens=args.max_new_tokens,
        max_samples=args.max_samples, output=args.output, device=args.device,
        precision=args.precision, batch_size=args.batch_size,
        cuda_graphs=not args.no_cuda_graphs,
    )
    print(json.dumps(out))
    return 0


def _eval_harness(args: argparse.Namespace) -> int:
    from tunesmith.eval.harness_run import result_rows, run_harness

    if args.generate or args.data:
        raise TunesmithError("--harness runs lm-eval tasks; it takes no --data / --generate")
    tasks = [t.strip() for t in args.harness.split(",")]
    results = run_harness(
        args.model, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
        batch_size=args.batch_size, device=args.device, precision=args.precision,
        include_path=args.include_path, output=args.output, base=args.base,
    )
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lm-eval on {args.model}", title_justify="left")
    for col, justify in (("task", "left"), ("shots", "right"), ("metric", "left"),
                         ("value", "right"), ("stderr", "right")):
        table.add_column(col, justify=justify)
    for row in result_rows(results):
        table.add_row(*row)
    Console(soft_wrap=True).print(table)
    if args.output:
        print(json.dumps({"results": args.output}))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from tunesmith.eval.run import run_generate

    text = run_generate(
        args.model, args.prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed, device=args.device,
    )
    print(text)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from tunesmith.peft import merge_adapter

    out = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype, device=args.device)
    print(json.dumps({"merged_model": str(out)}))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tunesmith.cli.demo import run_demo

    run_demo(args.output, steps=args.steps, overwrite=args.overwrite)
    return 0


def _train_epilog() -> str:
    from tunesmith.config.loader import describe_options

    return (
        "Every option below can be set in the recipe (nested YAML sections) or on the command "
        "line as section.key=value, e.g.\n  tunesmith train recipes/x.yaml optim.lr=3e-4 "
        "data.block_size=1024\n\noptions:\n" + "\n".join(describe_options())
    )


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (what and which flag) instead of the usage block."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tunesmith", description="Fine-tune and pre-train language models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train", help="train from a YAML recipe", epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("recipe", nargs="?", metavar="RECIPE",
                   help="YAML recipe (optional: key=value overrides alone also work)")
    t.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides (optional)")
    t.set_defaults(func=_train)
    add_launch_command(sub)
    _add_eval(sub)
    _add_model_commands(sub)
    add_data_command(sub)  # `tunesmith data inspect` (cli/data_inspect.py)

    d = sub.add_parser("demo", help="pre-train a small Llama on text shipped with Python (no download)")
    d.add_argument("--output", default="outputs/demo")
    d.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: recipe's)")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier demo run")
    d.set_defaults(func=_demo)
    add_report_command(sub)
    add_frontend_commands(sub)  # run_clm, run_mlm, run_lora_clm, llama-recipes
    return p


def _add_eval(sub) -> None:
    """`tunesmith eval`: loss/perplexity, --generate with ROUGE / exact match, or --harness
    with lm-evaluation-harness tasks."""
    e = sub.add_parser("eval", help="evaluation loss and perplexity of a model on a text file, "
                       "generation scores, or lm-eval tasks")
    e.add_argument("model", help="HF-format model directory (or hub id), or a PEFT adapter directory")
    e.add_argument("--data", default=None, type=nonempty, help="text/json/jsonl/csv/parquet file")
    e.add_argument("--block-size", type=positive_int, default=None, help="default: min(1024, model max)")
    e.add_argument("--batch-size", type=positive_int, default=8)
    e.add_argument("--text-column", default="text", type=nonempty)
    e.add_argument("--max-batches", type=positive_int, default=None)
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--precision", default="bf16", choices=PRECISIONS)
    e.add_argument("--generate", action="store_true",
                   help="answer the prompts of an SFT file and report ROUGE-1/2/L, exact match")
    e.add_argument("--recipe", default=None, help="--generate: take the sft section from here")
    e.add_argument("--format", default=None, choices=SFT_FORMATS)
    e.add_argument("--chat-template", default=None, help="tokenizer, llama3, chatml, alpaca")
    e.add_argument("--max-new-tokens", type=positive_int, default=128)
    e.add_argument("--max-samples", type=positive_int, default=None)
    e.add_argument("--output", default=None,
                   help="--generate: predictions JSONL path; --harness: lm-eval's results JSON")
    e.add_argument("--harness", default=None, type=nonempty, metavar="TASK[,TASK...]",
                   help="run lm-evaluation-harness tasks (pip install lm-eval)")
    e.add_argument("--num-fewshot", type=nonneg_int, default=None, help="--harness: few-shot examples")
    e.add_argument("--limit", type=positive_int, default=None, help="--harness: examples per task")
    e.add_argument("--include-path", default=None, type=nonempty,
                   help="--harness: a directory of your own task YAMLs")
    e.add_argument("--base", default=None, type=nonempty,
                   help="--harness: base model of an adapter directory (default: the one it names)")
    e.add_argument("--no-cuda-graphs", action="store_true",
                   help="--generate on CUDA: run decode steps eagerly, not as CUDA-graph replays")
    e.set_defaults(func=_eval)


def _add_model_commands(sub) -> None:
    """`tunesmith generate`, `export` and `merge`: commands on a saved model or checkpoint."""
    g = sub.add_parser("generate", help="generate text from a prompt (KV-cached)")
    g.add_argument("model", help="HF-format model directory (or hub id)")
    g.add_argument("--prompt", required=True, type=nonempty)
    g.add_argument("--max-new-tokens", type=positive_int, default=64)
    g.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=positive_int, default=None)
    g.add_argument("--seed", type=nonneg_int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.set_defaults(func=_generate)

    x = sub.add_parser("export", help="turn a training checkpoint into a Hugging Face model directory")
    x.add_argument("checkpoint", help="checkpoint dir (OUTPUT/checkpoints/step_N) or a run's output dir (newest)")
    x.add_argument("--format", default="hf", choices=["hf"], help="output format (default: hf)")
    x.add_argument("--out", required=True, help="directory to write (replaced if it is a saved model)")
    x.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   type=dtype_spelling(short=False),
                   help="cast weights (default: as trained; fp32/bf16/fp16 also work)")
    x.add_argument("--max-shard-size", default="5GB", type=byte_size, help="split safetensors above this (default 5GB)")
    x.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="allow checkpoint metadata that needs arbitrary code to unpickle (trusted sources only)")
    x.set_defaults(func=_export)

    m = sub.add_parser("merge", help="fold a PEFT adapter into its base model; write an HF model")
    m.add_argument("base", help="base model: HF-format directory or hub id")
    m.add_argument("adapter", help="PEFT adapter directory (adapter_config.json + weights)")
    m.add_argument("--out", required=True, help="output directory for the merged HF model")
    m.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   type=dtype_spelling(short=True),
                   help="saved dtype (auto: the base checkpoint's; float32/bfloat16/float16 also work)")
    m.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to merge")
    m.set_defaults(func=_merge)


def run(argv: list[str] | None, entry: Callable[[argparse.Namespace], int] | None = None) -> int:
    parser = build_parser()
    args, flags = parser.parse_known_args(argv)
    if flags and not getattr(args, "takes_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    args.flags = flags  # a front-end's own flags, parsed by tunesmith.frontends
    logging.basicConfig(
        level=logging.WARNING if args.quiet or not is_main_rank() else logging.INFO,
        format="%(message)s", stream=sys.stderr,
    )
    try:
        return (entry or args.func)(args)
    except TunesmithError as e:
        if args.debug:
            raise
        report_error(e)
        return e.exit_code
    except KeyboardInterrupt as e:
        print("tunesmith: interrupted", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))  # a second SIGTERM: 143, like the kill itself


def main(argv: list[str] | None = None) -> None:
    # Thread and progress-bar defaults must be in the environment before torch, tokenizers or
    # datasets load; nothing above imports them.
    apply_process_defaults(os.environ, sys.stderr.isatty())
    sys.exit(run_worker(lambda: run(argv)))


if __name__ == "__main__":
    main()
