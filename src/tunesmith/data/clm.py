"""Causal-LM datasets from raw text.

Pipeline (each step cached in the datasets cache, keyed by everything it depends on):

1. records: `sources.load_text_records` -> Dataset[text, doc_end].
2. tokenize: `Dataset.map(batched=True, num_proc=cfg.num_proc)` -> Dataset[input_ids: list[int32]].
   The tokenizer's own special tokens are kept (Llama tokenizers put BOS before every record, as
   in run_clm); EOS is appended per document when `add_eos` (see `sources` for what a document
   is). Our own fingerprint (records + tokenizer + mode + add_eos [+ block_size in lines mode])
   names the cache, so datasets never has to hash the tokenizer object, and any change of those
   inputs misses the cache instead of reusing stale ids.
3. split: `validation_path`, or a seeded share of the tokenized records (original order kept, so
   packed blocks still read as continuous text).
4. packed mode: ONE global concatenation of the split, cut into blocks of exactly block_size
   tokens; only the final remainder (< block_size tokens) is dropped. (run_clm drops a remainder
   per 1,000 records; we do not.) lines mode: one example per non-empty record, truncated.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tunesmith.config.schema import DataConfig
from tunesmith.cpu import tokenizer_workers
from tunesmith.data.sources import cache_root, load_text_records
from tunesmith.data.tokenizer import eos_appended_by_tokenizer, tokenizer_fingerprint
from tunesmith.errors import TunesmithError

# Bump when tokenisation/packing semantics change, so old caches are not reused.
_PIPELINE_VERSION = "1"
# datasets >= 4 names the list feature `List`; older releases only have `Sequence`.
_ListFeature: Any = getattr(datasets, "List", None) or datasets.Sequence


def _digest(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32]


class _Tokenize:
    """Batched map function: records -> input_ids (a class, so num_proc>1 can pickle it)."""

    def __init__(self, tokenizer: Any, *, mode: str, eos_id: int | None, block_size: int) -> None:
        self.tokenizer = tokenizer
        self.mode = mode
        self.eos_id = eos_id  # None: do not append
        self.block_size = block_size

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        texts: list[str] = batch["text"]
        ends: list[bool] = batch.get("doc_end") or [True] * len(texts)
        if self.mode == "lines":
            # One example per record; blank records carry no signal and are skipped.
            keep = [i for i, t in enumerate(texts) if t.strip()]
            texts = [texts[i] for i in keep]
            ends = [True] * len(texts)  # every line is its own example: EOS on each
        if not texts:
            return {"input_ids": []}
        encoded = self.tokenizer(
            texts, add_special_tokens=True, return_attention_mask=False, verbose=False
        )["input_ids"]
        out: list[list[int]] = []
        for ids, end in zip(encoded, ends):
            ids = list(ids)
            if self.eos_id is not None and end:
                ids.append(self.eos_id)
            if self.mode == "lines":
                ids = ids[: self.block_size]  # a cut example loses its EOS: it did not end there
            out.append(ids)
        return {"input_ids": out}


def eos_to_append(cfg: DataConfig, tokenizer: Any) -> int | None:
    if not cfg.add_eos:
        return None
    if tokenizer.eos_token_id is None:
        raise TunesmithError(
            "data.add_eos is set but the tokenizer has no EOS token; set data.add_eos=false"
        )
    # A tokenizer whose post-processor already appends EOS must not get a second one.
    return None if eos_appended_by_tokenizer(tokenizer) else tokenizer.eos_token_id


def _tokenize(
    records: datasets.Dataset, cfg: DataConfig, tokenizer: Any, tok_fp: str, eos_id: int | None
) -> datasets.Dataset:
    """records -> Dataset[input_ids], cached under a fingerprint of every input that matters."""
    # Packed tokenisation does not depend on block_size (packing does, and has its own key).
    block_key = cfg.block_size if cfg.mode == "lines" else "-"
    fp = _digest(
        "tok", _PIPELINE_VERSION, records._fingerprint, tok_fp, cfg.mode, eos_id, block_key
    )
    fn = _Tokenize(tokenizer, mode=cfg.mode, eos_id=eos_id, block_size=cfg.block_size)
    features = datasets.Features({"input_ids": _ListFeature(datasets.Value("int32"))})
    return records.map(
        fn,
        batched=True,
        num_proc=tokenizer_workers(cfg.num_proc, len(records)),
        remove_columns=records.column_names,
        features=features,
        new_fingerprint=fp,
        desc="tokenizing",
    )


def _load_records(path: str, cfg: DataConfig) -> datasets.Dataset:
    return load_text_records(
        path,
        text_column=cfg.text_column,
        keep_linebreaks=cfg.mode == "packed",  # run_clm keeps line breaks; lines mode strips them
        dataset_config=cfg.dataset_config,
        split=cfg.split,
        cache_dir=cfg.cache_dir,
        skip_bad_rows=cfg.skip_bad_rows,
    )


def split_indices(n: int, percentage: float, seed: int,
                  source: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """Seeded, disjoint (train, validation) row indices, each sorted to keep document order;
    `source` (data.path) names the data in the error."""
    n_val = max(1, round(n * percentage / 100))
    if n_val >= n:
        raise TunesmithError(
            f"{source} has {n} records, too few to hold out {percentage}% for validation; lower "
            "data.validation_split_percentage or set data.validation_path"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    is_val = np.zeros(n, dtype=bool)
    is_val[perm[:n_val]] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _split(
    ds: datasets.Dataset, cfg: DataConfig, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    train_idx, val_idx = split_indices(len(ds), cfg.validation_split_percentage, seed, cfg.path)
    key = (ds._fingerprint, seed, cfg.validation_split_percentage)
    # The indices mapping stays in memory (8 bytes a row); new_fingerprint avoids hashing it.
    train = ds.select(train_idx, keep_in_memory=True, new_fingerprint=_digest("train", *key))
    val = ds.select(val_idx, keep_in_memory=True, new_fingerprint=_digest("val", *key))
    return train, val


def _write_blocks(ds: datasets.Dataset, block_size: int, out: Path) -> int:
    """Concatenate all input_ids of `ds` in order and write [n_blocks, block_size] int32 rows."""
    features = datasets.Features(
        {"input_ids": _ListFeature(datasets.Value("int32"), length=block_size)}
    )
    schema = features.arrow_schema
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    carry = np.zeros(0, dtype=np.int32)  # tokens waiting to fill a block, < block_size of them
    n_blocks = 0
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for table in ds.with_format("arrow").iter(batch_size=1000):
                flat = pc.list_flatten(table.column("input_ids")).to_numpy().astype(np.int32)
                stream = np.concatenate([carry, flat])  # [len(carry) + tokens in this batch]
                full = len(stream) // block_size
                if full:
                    blocks = stream[: full * block_size]  # [full * block_size]
                    arr = pa.FixedSizeListArray.from_arrays(pa.array(blocks), block_size)
                    writer.write_batch(pa.record_batch([arr], schema=schema))
                    n_blocks += full
                carry = stream[full * block_size :]
        os.replace(tmp, out)  # atomic: a concurrent rank or a crash never leaves half a file
    finally:
        tmp.unlink(missing_ok=True)
    return n_blocks


def _pack(ds: datasets.Dataset, cfg: DataConfig, what: str) -> datasets.Dataset:
    root = cache_root(cfg.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    fp = _digest("pack", _PIPELINE_VERSION, ds._fingerprint, cfg.block_size)
    out = root / f"packed-{fp}.arrow"
    if not out.exists():
        _write_blocks(ds, cfg.block_size, out)
    packed = datasets.Dataset.from_file(str(out))
    if len(packed) == 0:
        n_tokens = sum(len(x) for x in ds["input_ids"])
        raise TunesmithError(
            f"{what} has {n_tokens} tokens, fewer than one block of data.block_size="
            f"{cfg.block_size}; lower data.block_size or add data"
        )
    return packed


def _finalize(
    ds: datasets.Dataset, cfg: DataConfig, limit: int | None, what: str
) -> datasets.Dataset:
    if cfg.mode == "packed":
        ds = _pack(ds, cfg, what)
    elif len(ds) == 0:
        raise TunesmithError(f"{what} has no non-empty records (lines mode skips blank ones)")
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return ds


def _check_lengths(cfg: DataConfig, max_positions: int | None) -> None:
    if max_positions is None:
        return
    if cfg.block_size > max_positions:
        raise TunesmithError(
            f"data.block_size={cfg.block_size} exceeds the model's max positions ({max_positions})"
        )
    if cfg.mode == "lines" and cfg.pad_to_multiple_of:
        m = cfg.pad_to_multiple_of
        padded = -(-cfg.block_size // m) * m
        if padded > max_positions:
            raise TunesmithError(
                f"data.block_size={cfg.block_size} padded to a multiple of "
                f"data.pad_to_multiple_of={m} is {padded}, over the model's max positions "
                f"({max_positions})"
            )


def build_clm_datasets(
    cfg: DataConfig, tokenizer: Any, *, seed: int, max_positions: int | None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, validation) datasets with an `input_ids` column (list[int]).

    packed: every row is exactly `cfg.block_size` tokens. lines: one row per non-empty record,
    at most `cfg.block_size` tokens. Validation is `cfg.validation_path` when set (the split
    percentage is then ignored), else a `seed`-determined share of the training records, else None.
    """
    if cfg.path is None:
        raise TunesmithError("data.path is required: a text file, directory or dataset name")
    _check_lengths(cfg, max_positions)
    eos_id = eos_to_append(cfg, tokenizer)
    tok_fp = tokenizer_fingerprint(tokenizer)

    train = _tokenize(_load_records(cfg.path, cfg), cfg, tokenizer, tok_fp, eos_id)
    val: datasets.Dataset | None = None
    if cfg.validation_path is not None:
        val = _tokenize(_load_records(cfg.validation_path, cfg), cfg, tokenizer, tok_fp, eos_id)
    elif cfg.validation_split_percentage > 0:
        train, val = _split(train, cfg, seed)

    train = _finalize(train, cfg, cfg.max_train_samples, f"training data {cfg.path}")
    if val is not None:
        val = _finalize(val, cfg, cfg.max_eval_samples,
                        f"validation data {cfg.validation_path or cfg.path}")
    return train, val
