"""Data assembly: (task, data config, tokenizer) -> the run's loaders, in one place.

    clm  raw text: packed blocks or lines (files, hub datasets); with data.streaming a
         StreamingLoader cutting the stream into blocks
    sft  instruction / chat / summarization records (tunesmith.data.sft*), response-only
         labels, optional packing without cross-talk; streaming too
    mlm  raw text as for clm, masked dynamically by MLMCollator; needs an encoder family
    dpo  preference pairs (tunesmith.data.preference): one item a pair, PairCollator batches
         B pairs as 2B interleaved rows (chosen, rejected, ...)

Every loader shards by data-parallel rank (`Shard`), given by the caller: the data layer
knows nothing of process groups.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tunesmith.config import RunConfig
from tunesmith.data.clm import build_clm_datasets, eos_to_append
from tunesmith.data.collate import make_collator
from tunesmith.data.loader import StatefulLoader
from tunesmith.data.mlm import MaskingSpec, MLMCollator
from tunesmith.data.preference import PairCollator, build_preference_datasets
from tunesmith.data.records import RecordReader
from tunesmith.data.sft import InvalidRecord, Rendered, SFTFormatter
from tunesmith.data.sft_data import (
    SFTCollator,
    SFTStats,
    SFTTokenizer,
    build_sft_datasets,
    filter_category,
    pad_id_of,
    render_split,
)
from tunesmith.data.streaming import StreamingLoader
from tunesmith.errors import TunesmithError
from tunesmith.models.family import ModelFamily

log = logging.getLogger("tunesmith")


class Shard(NamedTuple):
    """This process's data-parallel rank and degree ((0, 1) in one process)."""

    rank: int
    world: int


@dataclass
class TaskData:
    train_loader: StatefulLoader | StreamingLoader
    val_loader: StatefulLoader | None
    sized: bool  # the train loader has a length (epochs); streams do not
    stats: dict[str, Any] = field(default_factory=dict)
    formatter: SFTFormatter | None = None  # SFT: renders records; reused by generation eval
    val_rendered: list[tuple[str, Rendered]] = field(default_factory=list)  # SFT held-out


def check_task_family(cfg: RunConfig, family: ModelFamily) -> None:
    kind = getattr(family, "kind", "causal")
    if cfg.task == "mlm" and kind != "masked":
        raise TunesmithError(
            f"task=mlm needs an encoder (bert, roberta); model {cfg.model.name!r} is a "
            f"{family.name} decoder: use task=clm or sft, or an encoder model")
    if cfg.task in ("clm", "sft", "dpo") and kind == "masked":
        raise TunesmithError(
            f"task={cfg.task} needs a causal LM; model {cfg.model.name!r} is a {family.name} "
            "encoder: use task=mlm")


def _stateful(ds: Any, cfg: RunConfig, collate: Any, train: bool, shard: Shard) -> StatefulLoader:
    rank, world = shard
    if train:
        mb = cfg.train.micro_batch_size
        if cfg.data.drop_last and len(ds) // world < mb:
            # the loader's own check cannot name the data or the keys to change
            raise TunesmithError(
                f"the training set of {cfg.data.path} has {len(ds)} rows (examples after "
                f"packing, splitting and filtering), fewer than one batch of "
                f"train.micro_batch_size={mb} x {world} rank(s): lower train.micro_batch_size, "
                "add data, or set data.drop_last=false")
        loader = StatefulLoader(ds, batch_size=cfg.train.micro_batch_size, collate_fn=collate,
                                shuffle=True, seed=cfg.train.seed, drop_last=cfg.data.drop_last,
                                rank=rank, world_size=world)
        if len(loader) < cfg.train.grad_accum_steps:
            raise TunesmithError(
                f"the training set gives {len(loader)} micro-batches per epoch, fewer than "
                f"train.grad_accum_steps={cfg.train.grad_accum_steps}: use more data or smaller "
                "batches")
        return loader
    return StatefulLoader(ds, batch_size=cfg.eval.batch_size or cfg.train.micro_batch_size,
                          collate_fn=collate, shuffle=False, seed=cfg.train.seed,
                          drop_last=False, rank=rank, world_size=world)


def _mlm_collator(cfg: RunConfig, tokenizer: Any) -> Any:
    m = cfg.mlm
    spec = MaskingSpec.from_tokenizer(tokenizer, whole_word=m.whole_word)
    return MLMCollator(spec, probability=m.probability, mask_fraction=m.mask_fraction,
                       random_fraction=m.random_fraction, whole_word=m.whole_word,
                       seed=cfg.train.seed, pad_to_multiple_of=cfg.data.pad_to_multiple_of)


# Compiled blocks see one graph per distinct padded length (and inductor guards on its
# alignment), so variable-length batches would recompile for many lengths; padded to a multiple
# of this the lengths fall into a few classes, all aligned.
COMPILE_PAD_MULTIPLE = 64


def pad_multiple(cfg: RunConfig) -> int | None:
    """What unpacked SFT and DPO batches are padded to a multiple of: data.pad_to_multiple_of
    when set, else COMPILE_PAD_MULTIPLE under train.compile, else the longest row. Under tensor
    parallelism the length is also made a multiple of parallel.tp: sequence parallelism splits
    [B, T, D] into equal [B, T/tp, D] slices, and ragged slices would make the TP ranks'
    collectives disagree in size."""
    multiple = cfg.data.pad_to_multiple_of or (COMPILE_PAD_MULTIPLE if cfg.train.compile else None)
    tp = cfg.parallel.tp
    if tp > 1:
        return math.lcm(multiple or 1, tp)
    return multiple


def _sft_collator(cfg: RunConfig, tokenizer: Any) -> Any:
    return SFTCollator(pad_id_of(tokenizer), pad_multiple(cfg))


def _sft_data(cfg: RunConfig, tokenizer: Any, tok_source: str, shard: Shard) -> TaskData:
    if cfg.data.streaming:
        return _sft_stream(cfg, tokenizer, tok_source, shard)
    data = build_sft_datasets(cfg.data, cfg.sft, tokenizer, seed=cfg.train.seed,
                              tokenizer_source=tok_source)
    task = _record_loaders(cfg, data, _sft_collator(cfg, tokenizer), shard)
    task.formatter = SFTFormatter(cfg.sft, tokenizer, tok_source, add_eos=cfg.data.add_eos)
    task.val_rendered = data.val_rendered
    return task


def _record_loaders(cfg: RunConfig, data: Any, collate: Any, shard: Shard) -> TaskData:
    """Loaders over in-memory record datasets (SFT examples, DPO pairs) and their stats."""
    val = None
    if data.val is not None and len(data.val):
        val = _stateful(data.val, cfg, collate, False, shard)
    return TaskData(_stateful(data.train, cfg, collate, True, shard), val, True,
                    {"train": data.stats.to_dict(),
                     **({"validation": data.val_stats.to_dict()} if data.val_stats else {})})


def _dpo_data(cfg: RunConfig, tokenizer: Any, tok_source: str, shard: Shard) -> TaskData:
    """Preference pairs; train.micro_batch_size counts pairs (2 rows each)."""
    data = build_preference_datasets(cfg.data, cfg.sft, tokenizer, seed=cfg.train.seed,
                                     tokenizer_source=tok_source)
    return _record_loaders(cfg, data, PairCollator(pad_id_of(tokenizer), pad_multiple(cfg)), shard)


def _sft_stream(cfg: RunConfig, tokenizer: Any, tok_source: str, shard: Shard) -> TaskData:
    formatter = SFTFormatter(cfg.sft, tokenizer, tok_source, add_eos=cfg.data.add_eos)
    tok = SFTTokenizer(tokenizer, cfg.data.block_size, train_on_inputs=cfg.sft.train_on_inputs,
                       overlong=cfg.sft.overlong)
    stats = SFTStats()
    categories = cfg.sft.category if cfg.sft.format == "dolly" else None

    def encode(record: Any, where: str) -> Any:
        stats.records += 1
        if categories is not None and formatter.category_of(record) not in categories:
            stats.filtered_category += 1
            return None
        try:
            rendered = formatter(record, where)
        except InvalidRecord as exc:
            if cfg.sft.invalid != "skip":
                raise exc.with_skip_hint() from exc
            stats.note_skip(str(exc))
            return None
        (ids, mask), = tok.encode([rendered])
        return tok.apply_policy(ids, mask, where, stats)

    loader = _stream_loader(cfg, RecordReader(cfg.data.path, dataset_config=cfg.data.dataset_config,
                                              split=cfg.data.split, streaming_hub=True,
                                              skip_bad_rows=cfg.data.skip_bad_rows),
                            encode, "packed" if cfg.sft.packing else "examples",
                            _sft_collator(cfg, tokenizer), shard)
    val, val_rendered = None, []
    if cfg.data.validation_path:
        vcfg = cfg.data.model_copy(update={"path": cfg.data.validation_path,
                                           "validation_path": None,
                                           "validation_split_percentage": 0})
        vdata = build_sft_datasets(vcfg, cfg.sft, tokenizer, seed=cfg.train.seed,
                                   tokenizer_source=tok_source)
        val = _stateful(vdata.train, cfg, _sft_collator(cfg, tokenizer), False, shard)
        val_reader = RecordReader(cfg.data.validation_path, skip_bad_rows=cfg.data.skip_bad_rows)
        records, _ = filter_category(formatter, val_reader.read_all(), cfg.sft,
                                     cfg.data.validation_path)
        val_rendered, _ = render_split(formatter, records, cfg.sft, cfg.data.validation_path)
    return TaskData(loader, val, False, {"train_stream": stats}, formatter, val_rendered)


def _stream_loader(cfg: RunConfig, reader: Any, encode: Any, mode: str, collate: Any,
                   shard: Shard) -> StreamingLoader:
    rank, world = shard  # each rank reads every world-th record of the stream
    return StreamingLoader(reader, encode, mode=mode, batch_size=cfg.train.micro_batch_size,
                           collate_fn=collate, block_size=cfg.data.block_size,
                           seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                           rank=rank, world_size=world, drop_last=True)


def _text_stream(cfg: RunConfig, tokenizer: Any, collate: Any, shard: Shard) -> StreamingLoader:
    """Raw text records -> token lists (BOS as the tokenizer adds it, EOS per record)."""
    eos = eos_to_append(cfg.data, tokenizer)
    column = cfg.data.text_column

    def encode(record: Any, where: str) -> list[int]:
        text = record.get(column) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise TunesmithError(f"{where}: text column '{column}' missing or not a string "
                                 "(set data.text_column)")
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        return ids + [eos] if eos is not None else ids

    reader = RecordReader(cfg.data.path, dataset_config=cfg.data.dataset_config,
                          split=cfg.data.split, streaming_hub=True,
                          skip_bad_rows=cfg.data.skip_bad_rows)
    mode = "blocks" if cfg.data.mode == "packed" else "examples"
    if mode == "examples":
        base = encode

        def encode(record: Any, where: str) -> Any:  # type: ignore[no-redef]
            ids = base(record, where)[: cfg.data.block_size]
            return {"input_ids": ids} if ids else None

    return _stream_loader(cfg, reader, encode, mode, collate, shard)


def _raw_text_data(cfg: RunConfig, tokenizer: Any, max_positions: int, collate: Any,
                   shard: Shard) -> TaskData:
    """clm and mlm: raw text (files, hub datasets or a stream) with the given collator."""
    if cfg.data.streaming:
        val = None
        if cfg.data.validation_path:
            vcfg = cfg.data.model_copy(update={"path": cfg.data.validation_path,
                                               "validation_path": None,
                                               "validation_split_percentage": 0})
            vds, _ = build_clm_datasets(vcfg, tokenizer, seed=cfg.train.seed,
                                        max_positions=max_positions)
            val = _stateful(vds, cfg, collate, False, shard)
        return TaskData(_text_stream(cfg, tokenizer, collate, shard), val, False)
    train_ds, val_ds = build_clm_datasets(cfg.data, tokenizer, seed=cfg.train.seed,
                                          max_positions=max_positions)
    val = _stateful(val_ds, cfg, collate, False, shard) if val_ds is not None and len(val_ds) else None
    return TaskData(_stateful(train_ds, cfg, collate, True, shard), val, True)


def build_task_data(cfg: RunConfig, family: ModelFamily, tokenizer: Any, max_positions: int,
                    tok_source: str, shard: Shard = Shard(0, 1)) -> TaskData:
    """The loaders of the run's task: (task, data config, tokenizer) -> train/val loaders.

    `shard`: this process's data-parallel (rank, degree); tensor-parallel ranks of one
    data-parallel group share a rank (they must read the same batches)."""
    check_task_family(cfg, family)
    if cfg.data.block_size > max_positions:
        raise TunesmithError(f"data.block_size={cfg.data.block_size} exceeds the model's max "
                             f"positions ({max_positions})")
    if cfg.task == "sft":
        return _sft_data(cfg, tokenizer, tok_source, shard)
    if cfg.task == "dpo":
        return _dpo_data(cfg, tokenizer, tok_source, shard)
    collate = _mlm_collator(cfg, tokenizer) if cfg.task == "mlm" else make_collator(cfg.data, tokenizer)
    return _raw_text_data(cfg, tokenizer, max_positions, collate, shard)
