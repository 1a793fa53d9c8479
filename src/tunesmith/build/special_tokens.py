"""The tokenizer decides the special-token ids a trained model is saved with.

A preset (or a config.json from another model) carries the ids of its own vocabulary: the
`tiny` preset says bos 1, eos 2. Trained with the Llama 3 tokenizer, where id 2 is `#`, a saved
model with those ids makes `transformers.generate` stop at `#`. So whenever the model config and
the tokenizer disagree, the tokenizer's ids go into the model config (and from there into the
saved config.json and generation_config.json), with a note in the log.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

log = logging.getLogger("tunesmith")

_NAMES = ("bos_token_id", "eos_token_id", "pad_token_id")


def _agrees(name: str, mine: Any, theirs: Any) -> bool:
    if mine == theirs:
        return True
    if isinstance(mine, list) and theirs in mine:
        return True  # several stop ids (Llama 3 instruct: end_of_text, eom, eot) that hold it
    # pad: a config without one is fine (the loader pads with eos); only a conflicting id is wrong
    return name == "pad_token_id" and (mine is None or theirs is None)


def align_special_tokens(cfg: Any, tokenizer: Any, tokenizer_source: str) -> Any:
    """`cfg` with bos/eos/pad ids taken from `tokenizer` where the two disagree."""
    changes = {name: getattr(tokenizer, name, None) for name in _NAMES
               if not _agrees(name, getattr(cfg, name, None), getattr(tokenizer, name, None))}
    if not changes:
        return cfg
    was = ", ".join(f"{n.removesuffix('_token_id')} {getattr(cfg, n, None)}" for n in changes)
    now = ", ".join(f"{n.removesuffix('_token_id')} {v}" for n, v in changes.items())
    log.info("special tokens: the tokenizer %s says %s where the model config said %s; the "
             "tokenizer's ids are used and saved", tokenizer_source, now, was)
    if hasattr(cfg, "hf"):  # the generic transformers fallback keeps the HF dict itself
        return dataclasses.replace(cfg, hf={**cfg.hf, **changes})
    return dataclasses.replace(cfg, **changes)
