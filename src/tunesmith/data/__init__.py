"""Tokenizers, raw-text causal-LM datasets, collators and a resumable loader."""

from tunesmith.data.clm import build_clm_datasets
from tunesmith.data.collate import IGNORE_INDEX, PackedCollator, PaddedCollator, make_collator
from tunesmith.data.loader import StatefulLoader
from tunesmith.data.tokenizer import load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "PackedCollator",
    "PaddedCollator",
    "StatefulLoader",
    "build_clm_datasets",
    "load_tokenizer",
    "make_collator",
]
