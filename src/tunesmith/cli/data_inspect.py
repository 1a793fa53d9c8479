"""`tunesmith data inspect RECIPE [overrides] [--n 3]`: what the model will be trained on.

Builds the training loader exactly as `tunesmith train` does (same config, tokenizer, task,
shuffling seed) and prints its first `--n` rows token by token: prompt tokens (no loss) dim,
target tokens highlighted, and for packed rows each document's boundary with its positions.
Then the counts: examples, tokens, the share of tokens that are targets, and (SFT) how many
examples were truncated or dropped. task=dpo shows `--n` pairs, each as its chosen and its
rejected row, and counts pairs. Nothing is trained and nothing is written.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from tunesmith.cli.argtypes import positive_int

if TYPE_CHECKING:  # torch loads only when the command runs (`tunesmith --help` stays light)
    import torch

IGNORE_INDEX = -100
PROMPT_STYLE, TARGET_STYLE, BOUNDARY_STYLE = "dim", "bold green", "bold magenta"


def add_data_command(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("data", help="look at the training data as the loader yields it")
    actions = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    i = actions.add_parser(
        "inspect", help="show the first examples with their loss mask, packing and counts",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    i.add_argument("recipe", help="YAML recipe (or key=value overrides alone)")
    i.add_argument("overrides", nargs="*", help="section.key=value overrides")
    i.add_argument("--n", type=positive_int, default=3, help="rows to show (default 3; task=dpo: pairs)")
    i.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from tunesmith.config import load_config

    recipe, overrides = args.recipe, list(args.overrides)
    if "=" in recipe and not Path(recipe).exists():
        recipe, overrides = None, [recipe, *overrides]
    cfg = load_config(recipe, overrides)
    loader, tokenizer, stats, target_shift = training_loader(cfg)
    console = Console(highlight=False, soft_wrap=True)
    pairs = cfg.task == "dpo"  # rows come as (chosen, rejected) of each pair, interleaved
    start = loader.state_dict()
    rows = first_rows(loader, 2 * args.n if pairs else args.n)
    if hasattr(loader, "__len__"):  # count the whole epoch, not what first_rows left of it
        loader.load_state_dict(start)
    console.print(_legend(cfg, target_shift))
    for i, row in enumerate(rows):
        name = f"pair {i // 2} {('chosen', 'rejected')[i % 2]}" if pairs else f"row {i}"
        console.print(f"\n[bold]{name}[/bold] ({int(row['input_ids'].numel())} tokens)")
        console.print(render_row(row, tokenizer, target_shift))
    console.print()
    console.print(describe_counts(count_loader(loader, stats), cfg))
    return 0


def training_loader(cfg: Any) -> tuple[Any, Any, dict[str, Any], int]:
    """(train loader, tokenizer, task stats, target shift) as `tunesmith train` builds them.

    target shift: 1 for causal LMs (labels[t] is the target of token t + 1), 0 for masked LMs
    (labels[t] is the original token at a masked position t).
    """
    from tunesmith.build.spec import resolve_spec
    from tunesmith.data.assembly import build_task_data

    spec = resolve_spec(cfg)  # the model config, the tokenizer and its checks, as train has them
    task = build_task_data(cfg, spec.family, spec.tokenizer, spec.max_positions,
                           spec.tokenizer_source)
    shift = 0 if spec.family.kind == "masked" else 1
    return task.train_loader, spec.tokenizer, task.stats.get("train", {}), shift


def first_rows(loader: Any, n: int) -> list[dict[str, torch.Tensor]]:
    """The first `n` rows the loader yields, one dict of [T] tensors each."""
    import torch

    rows: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        for b in range(batch["input_ids"].size(0)):
            rows.append({k: v[b] for k, v in batch.items() if isinstance(v, torch.Tensor)})
            if len(rows) == n:
                return rows
    return rows


def target_mask(row: dict[str, torch.Tensor], shift: int) -> torch.Tensor:
    """[T] bool: token t is trained on (predicted, for a causal LM, from token t - 1)."""
    has_label = row["labels"] != IGNORE_INDEX
    if shift == 0:
        return has_label
    mask = has_label.new_zeros(has_label.shape)
    mask[1:] = has_label[:-1]
    return mask


def token_pieces(ids: list[int], tokenizer: Any) -> list[str]:
    """The text each token adds, spaces included (SentencePiece's `▁` and byte-level BPE's
    `Ġ` only turn into spaces when decoded in context, so prefixes are decoded)."""
    pieces, prev = [], ""
    for t in range(len(ids)):
        now = tokenizer.decode(ids[: t + 1], skip_special_tokens=False,
                               clean_up_tokenization_spaces=False)
        pieces.append(now[len(prev):] if now.startswith(prev) else tokenizer.decode([ids[t]]))
        prev = now
    return pieces


def render_row(row: dict[str, torch.Tensor], tokenizer: Any, shift: int):
    """rich Text of one row: prompt tokens dim, targets highlighted, document boundaries."""
    from rich.text import Text

    mask = row.get("attention_mask")
    real = row["input_ids"].numel() if mask is None else int(mask.sum())
    ids = row["input_ids"].tolist()[:real]  # padding sits at the end of a row
    targets = target_mask(row, shift).tolist()
    docs = row.get("doc_ids")
    positions = row.get("position_ids")
    if docs is not None and bool((docs == -1).any()):
        real = int((docs != -1).sum())  # packed rows pad with doc id -1
        ids = ids[:real]
    text = Text()
    for t, piece in enumerate(token_pieces(ids, tokenizer)):
        if docs is not None and (t == 0 or int(docs[t]) != int(docs[t - 1])):
            text.append(_boundary(docs, positions, t), style=BOUNDARY_STYLE)
        if shift == 0 and targets[t]:  # masked LM: the shown token hides the original
            piece = f"{piece}→{tokenizer.decode([int(row['labels'][t])])}"
        text.append(piece, style=TARGET_STYLE if targets[t] else PROMPT_STYLE)
    pad = row["input_ids"].numel() - len(ids)
    if pad:
        text.append(f"⟦{pad} padding⟧", style=PROMPT_STYLE)
    return text


def _boundary(docs: torch.Tensor, positions: torch.Tensor | None, t: int) -> str:
    """`⟦doc 2 · pos 0-57⟧` at the first token of a packed document (-1: padding)."""
    doc, end = int(docs[t]), t
    while end + 1 < docs.numel() and int(docs[end + 1]) == doc:
        end += 1
    if positions is None:
        return f"⟦doc {doc} · tokens {t}-{end}⟧"
    return f"⟦doc {doc} · pos {int(positions[t])}-{int(positions[end])}⟧"


def count_loader(loader: Any, stats: dict[str, Any]) -> dict[str, Any]:
    """Examples, tokens and target tokens over one epoch of the loader (a stream: what the
    task reported), plus the task's truncation and drop counts where it keeps them."""
    counts: dict[str, Any] = {"rows": 0, "tokens": 0, "target_tokens": 0}
    if hasattr(loader, "__len__"):
        for batch in loader:
            mask = batch.get("attention_mask")
            counts["rows"] += int(batch["input_ids"].size(0))
            counts["tokens"] += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            counts["target_tokens"] += int((batch["labels"] != IGNORE_INDEX).sum())
    for key in ("examples", "pairs", "truncated", "dropped_overlong", "dropped_no_target",
                "dropped_identical", "invalid_skipped", "filtered_category"):
        if key in stats:
            counts[key] = stats[key]
    counts.setdefault("examples", counts["rows"])
    return counts


def describe_counts(c: dict[str, Any], cfg: Any) -> str:
    if not c["rows"]:
        return (f"examples: {c['examples']} (a stream: rows are cut as training reads them; "
                "counts over a whole epoch need a sized data set)")
    share = c["target_tokens"] / c["tokens"] if c["tokens"] else 0.0
    what = (f"pairs: {c['pairs']}; one epoch yields {c['rows'] // 2} pairs ({c['rows']} rows: "
            "chosen, rejected) of up to" if "pairs" in c else
            f"examples: {c['examples']}; one epoch yields {c['rows']} rows of up to")
    lines = [
        (f"{what} "
         f"{cfg.data.block_size} tokens"
         + (" (data.drop_last leaves out an incomplete last batch)" if cfg.data.drop_last else "")),
        (f"tokens: {c['tokens']:,} (padding excluded)  targets: {c['target_tokens']:,} "
         f"({share:.1%} of tokens carry a loss)"),
    ]
    if "pairs" in c:
        lines.append(f"truncated: {c['truncated']}  dropped pairs: overlong "
                     f"{c['dropped_overlong']}, no target left {c['dropped_no_target']}, "
                     f"identical sides {c['dropped_identical']}  invalid skipped: "
                     f"{c['invalid_skipped']}")
    elif "truncated" in c:
        dropped = c["dropped_overlong"] + c["dropped_no_target"]
        lines.append(f"truncated: {c['truncated']}  dropped: {dropped} (overlong "
                     f"{c['dropped_overlong']}, no target left {c['dropped_no_target']})  "
                     f"invalid skipped: {c['invalid_skipped']}  filtered by category: "
                     f"{c['filtered_category']}")
    return "\n".join(lines)


def _legend(cfg: Any, shift: int) -> str:
    what = "masked positions (shown → original)" if shift == 0 else "tokens the loss trains on"
    return (f"task={cfg.task}, data.path={cfg.data.path}: [{PROMPT_STYLE}]dim = no loss "
            f"(prompt, padding)[/{PROMPT_STYLE}], [{TARGET_STYLE}]highlighted = {what}"
            f"[/{TARGET_STYLE}], [{BOUNDARY_STYLE}]⟦doc k · pos a-b⟧[/{BOUNDARY_STYLE}] = a "
            "packed document and its positions")
