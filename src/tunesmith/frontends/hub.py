"""Hub names the guides use, resolved to local copies when there are any.

Data sets: `--dataset_name wikitext --dataset_config_name wikitext-2-raw-v1` (and the other
names below) are looked up in a local mirror, the folder named by the environment variable
`TUNESMITH_DATASETS`, laid out as in the table (the layout of the project's shared data).
Found: the recipe points at those files. Not found: online, the hub name is passed on to the
engine (`data.path`); offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), one line says which file
is missing and how to supply it.

Models: the guides' legacy un-namespaced ids (`gpt2`, `roberta-base`) are spelled as their
current hub repos, so that a hub id is never mistaken for the tunesmith preset of the same
name (a preset is an untrained architecture; `--model_name_or_path gpt2` means the weights).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError

MIRROR_ENV = "TUNESMITH_DATASETS"


@dataclass(frozen=True)
class KnownDataset:
    """Where a hub data set lives inside the mirror, per split (paths relative to it)."""

    train: str
    validation: str | None = None
    kind: str = "text"  # text, or the sft.format of its records


_WIKI = "text/{dir}/wiki.{split}.{ext}"


def _wikitext(folder: str, ext: str) -> KnownDataset:
    return KnownDataset(_WIKI.format(dir=folder, split="train", ext=ext),
                        _WIKI.format(dir=folder, split="valid", ext=ext))


KNOWN_DATASETS: dict[tuple[str, str | None], KnownDataset] = {
    ("wikitext", "wikitext-2-raw-v1"): _wikitext("wikitext-2", "raw"),
    ("wikitext", "wikitext-2-v1"): _wikitext("wikitext-2", "tokens"),
    ("wikitext", "wikitext-103-raw-v1"): _wikitext("wikitext-103", "raw"),
    ("wikitext", "wikitext-103-v1"): _wikitext("wikitext-103", "tokens"),
    ("tatsu-lab/alpaca", None): KnownDataset("instruct/alpaca/alpaca_data.json", kind="alpaca"),
    ("databricks/databricks-dolly-15k", None): KnownDataset(
        "instruct/dolly/databricks-dolly-15k.jsonl", kind="dolly"),
    ("Samsung/samsum", None): KnownDataset("instruct/samsum/train.json",
                                           "instruct/samsum/validation.json", "summarization"),
    ("Abirate/english_quotes", None): KnownDataset("instruct/english_quotes/quotes.jsonl",
                                                   kind="quotes"),
}
_DATASET_ALIASES = {"samsum": "Samsung/samsum", "wikitext-2": "wikitext"}

# Un-namespaced ids from the guides -> the repos they now live in.
MODEL_ALIASES = {
    "gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2", "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large", "bert-base-uncased": "google-bert/bert-base-uncased",
    "bert-base-cased": "google-bert/bert-base-cased", "distilroberta-base": "distilbert/distilroberta-base",
}


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@dataclass(frozen=True)
class ResolvedData:
    """Training data for a recipe: local files, or a hub name passed on to the engine."""

    path: str
    validation: str | None = None
    dataset_config: str | None = None  # hub only
    kind: str = "text"
    hub: bool = False


def resolve_dataset(name: str, config: str | None, flag: str = "--dataset_name",
                    instead: str = "--train_file/--validation_file") -> ResolvedData:
    """A local path as given, a known hub data set from the mirror, or the hub name itself."""
    local = Path(name).expanduser()
    if local.exists():
        return ResolvedData(os.path.abspath(local))
    canonical = _DATASET_ALIASES.get(name, name)
    known = KNOWN_DATASETS.get((canonical, config))
    if known is None and config is None:
        # A name with configs (wikitext) given without one: HF fails too; say which exist.
        configs = sorted(c for (n, c) in KNOWN_DATASETS if n == canonical and c)
        if configs:
            raise TunesmithError(f"{flag} {name} needs --dataset_config_name (one of "
                                 f"{', '.join(configs)})")
    mirror = os.environ.get(MIRROR_ENV)
    if known is not None and mirror:
        train = Path(mirror).expanduser() / known.train
        if train.is_file():
            val = Path(mirror).expanduser() / known.validation if known.validation else None
            return ResolvedData(os.path.abspath(train),
                                os.path.abspath(val) if val is not None and val.is_file() else None,
                                kind=known.kind)
    if offline():
        where = (f"no local copy at {Path(mirror).expanduser() / known.train}" if known and mirror
                 else f"set {MIRROR_ENV} to a folder holding {known.train}" if known
                 else "it has no local mirror entry")
        label = f"{name} ({config})" if config else name
        raise TunesmithError(f"{flag} {label} is not available offline: {where}; or pass "
                             f"local files with {instead}")
    return ResolvedData(canonical, dataset_config=config, kind=known.kind if known else "text",
                        hub=True)


def resolve_model(name: str) -> str:
    """A local directory/file made absolute, a legacy hub id spelled as its repo, else as is."""
    local = Path(name).expanduser()
    if local.exists():
        return os.path.abspath(local)
    return MODEL_ALIASES.get(name, name)
