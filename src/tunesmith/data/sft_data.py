"""SFT examples: tokenization with loss masks, length policy, packing, datasets and collator.

An example is `{"input_ids": list[int], "loss_mask": list[bool]}`: loss_mask[t] says whether
token t is a *target* (a response token). Packed rows add `doc_ids` (which example each token
belongs to). The collator turns these into the trainer's contract (labels already shifted,
-100 where no target) and, for packed rows, per-document `doc_ids` / `position_ids`, so no
token attends to or predicts across an example boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tunesmith.data.clm import split_indices
from tunesmith.data.records import RecordReader
from tunesmith.data.sft import InvalidRecord, Rendered, SFTFormatter
from tunesmith.errors import TunesmithError
from tunesmith.models.attention import document_positions

log = logging.getLogger("tunesmith")
IGNORE_INDEX = -100
Example = dict[str, Any]


class RecordCounts:
    """Methods of the per-split record counters (dataclasses with `invalid_skipped` and
    `skipped_reasons`): SFTStats, and PreferenceStats (task=dpo)."""

    invalid_skipped: int
    skipped_reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # type: ignore[call-overload]
        d.pop("skipped_reasons")
        return d

    def note_skip(self, reason: str) -> None:
        self.invalid_skipped += 1
        if len(self.skipped_reasons) < 3:
            self.skipped_reasons.append(reason)


@dataclass
class SFTStats(RecordCounts):
    """What happened to the records, reported after building (and in the run summary)."""

    records: int = 0
    filtered_category: int = 0
    invalid_skipped: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    packed_rows: int = 0
    skipped_reasons: list[str] = field(default_factory=list)  # first few, for the log


def special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before every text by itself (BOS for Llama, nothing for GPT-2)."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


class SFTTokenizer:
    """Rendered examples -> (ids, loss mask), with the length policy applied."""

    def __init__(self, tokenizer: Any, block_size: int, *, train_on_inputs: bool = False,
                 overlong: str = "truncate") -> None:
        self.tok = tokenizer
        self.block_size = block_size
        self.train_on_inputs = train_on_inputs
        self.overlong = overlong
        self.prefix = special_prefix(tokenizer)
        self.eos_id = tokenizer.eos_token_id

    def encode(self, items: Sequence[Rendered]) -> list[tuple[list[int], list[bool]]]:
        """Token ids and target mask of each rendered example (before the length policy).

        The whole text is tokenized at once (what the model sees at inference), and each
        token is trainable when its last character lies in a trainable segment (offset
        mapping): a token merged across the boundary, like GPT-2's " Be" after a prompt that
        ends in a space, belongs to the response it completes.
        """
        texts = ["".join(t for t, _ in r.segments) for r in items]
        if getattr(self.tok, "is_fast", False):
            enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True,
                           verbose=False)
            pieces = [(list(ids), [self._in_spans(r, max(e - 1, s)) for s, e in offs])
                      for r, ids, offs in zip(items, enc["input_ids"], enc["offset_mapping"])]
        else:  # slow tokenizers have no offsets: tokenize segment by segment
            pieces = [self._by_segment(r) for r in items]
        out = []
        for r, (ids, mask) in zip(items, pieces):
            if r.prefix:
                ids, mask = self.prefix + ids, [False] * len(self.prefix) + mask
            if r.eos and self.eos_id is not None:
                ids, mask = ids + [self.eos_id], mask + [True]
            if self.train_on_inputs:
                mask = [True] * len(ids)
            out.append((ids, mask))
        return out

    @staticmethod
    def _in_spans(r: Rendered, char: int) -> bool:
        pos = 0
        for text, trainable in r.segments:
            if pos <= char < pos + len(text):
                return trainable
            pos += len(text)
        return False

    def _by_segment(self, r: Rendered) -> tuple[list[int], list[bool]]:
        ids: list[int] = []
        mask: list[bool] = []
        for text, trainable in r.segments:
            seg = list(self.tok(text, add_special_tokens=False)["input_ids"])
            ids += seg
            mask += [trainable] * len(seg)
        return ids, mask

    def apply_policy(self, ids: list[int], mask: list[bool], where: str,
                     stats: SFTStats) -> Example | None:
        """The example, cut or dropped per `overlong`; None when it is dropped."""
        if len(ids) > self.block_size:
            if self.overlong == "error":
                raise TunesmithError(
                    f"{where}: example has {len(ids)} tokens, more than data.block_size="
                    f"{self.block_size}; raise block_size or set sft.overlong=truncate or drop")
            if self.overlong == "drop":
                stats.dropped_overlong += 1
                return None
            ids, mask = ids[: self.block_size], mask[: self.block_size]
            stats.truncated += 1
        # Position 0 is never a target (nothing precedes it), so it needs a later target.
        if not any(mask[1:]):
            stats.dropped_no_target += 1
            return None
        stats.examples += 1
        stats.tokens += len(ids)
        stats.target_tokens += sum(mask[1:])
        return {"input_ids": ids, "loss_mask": mask}


def render_records(
    formatter: SFTFormatter, records: Iterable[tuple[str, Any]], stats: SFTStats,
    skip_invalid: bool, categories: list[str] | None = None,
) -> Iterator[tuple[str, Rendered]]:
    """(where, rendered) for usable records; filtered and skipped ones are counted."""
    for where, rec in records:
        stats.records += 1
        if categories is not None and formatter.category_of(rec) not in categories:
            stats.filtered_category += 1
            continue
        try:
            yield where, formatter(rec, where)
        except InvalidRecord as exc:
            if not skip_invalid:
                raise exc.with_skip_hint() from exc
            stats.note_skip(str(exc))


def tokenize_rendered(
    tok: SFTTokenizer, rendered: Sequence[tuple[str, Rendered]], stats: SFTStats,
    batch_size: int = 256,
) -> list[Example]:
    out: list[Example] = []
    for start in range(0, len(rendered), batch_size):
        chunk = rendered[start : start + batch_size]
        for (where, _), (ids, mask) in zip(chunk, tok.encode([r for _, r in chunk])):
            ex = tok.apply_policy(ids, mask, where, stats)
            if ex is not None:
                out.append(ex)
    return out


# ------------------------------------------------------------------------------ packing
def pack_examples(examples: Iterable[Example], block_size: int) -> Iterator[Example]:
    """Next-fit packing: examples in order, a new row whenever the next one does not fit.

    Rows hold `doc_ids` 0, 1, 2, ... per example; examples are never split (each is at most
    block_size tokens after the length policy).
    """
    ids: list[int] = []
    mask: list[bool] = []
    docs: list[int] = []
    n_docs = 0
    for ex in examples:
        n = len(ex["input_ids"])
        if ids and len(ids) + n > block_size:
            yield {"input_ids": ids, "loss_mask": mask, "doc_ids": docs}
            ids, mask, docs, n_docs = [], [], [], 0
        ids.extend(ex["input_ids"])
        mask.extend(ex["loss_mask"])
        docs.extend([n_docs] * n)
        n_docs += 1
    if ids:
        yield {"input_ids": ids, "loss_mask": mask, "doc_ids": docs}


class ListDataset(torch.utils.data.Dataset):
    """Map-style dataset over a list of examples (all in memory: SFT sets are small)."""

    def __init__(self, items: list[Example]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Example:
        return self.items[i]


# ------------------------------------------------------------------------------ collator
class SFTCollator:
    """Right-pads SFT examples or packed rows to the longest in the batch (or a multiple).

    Output: input_ids [B, T], labels [B, T] (labels[b, t] = input_ids[b, t+1] when token t+1
    is a target of the same example, else -100). Packed rows add doc_ids [B, T] (padding gets
    its own id -1) and position_ids [B, T] restarting at 0 in each example; unpacked batches
    add attention_mask [B, T] only when they contain padding.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        lengths = [len(ex["input_ids"]) for ex in examples]
        m = self.pad_to_multiple_of
        length = max(lengths) if not m else -(-max(lengths) // m) * m
        b = len(examples)
        packed = "doc_ids" in examples[0]
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)  # [B, T]
        target = torch.zeros((b, length), dtype=torch.bool)  # [B, T]: token t is a target
        docs = torch.full((b, length), -1, dtype=torch.long)  # [B, T]; -1 = padding
        for i, (ex, n) in enumerate(zip(examples, lengths)):
            input_ids[i, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            target[i, :n] = torch.as_tensor(ex["loss_mask"], dtype=torch.bool)
            docs[i, :n] = torch.as_tensor(ex["doc_ids"], dtype=torch.long) if packed else 0
        # Shift: position t predicts token t + 1, only inside the same example.
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        keep = target[:, 1:] & (docs[:, 1:] == docs[:, :-1]) & (docs[:, 1:] >= 0)  # [B, T-1]
        labels[:, :-1] = torch.where(keep, input_ids[:, 1:], IGNORE_INDEX)
        out = {"input_ids": input_ids, "labels": labels}
        real = (docs >= 0).long()  # [B, T]
        if packed:
            out["doc_ids"] = docs
            out["position_ids"] = document_positions(docs)
        if any(n < length for n in lengths):
            out["attention_mask"] = real
        return out


def pad_id_of(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise TunesmithError("SFT batches need a pad token, and the tokenizer has neither pad "
                             "nor eos")
    return int(pad)


# ------------------------------------------------------------------------------ datasets
@dataclass
class SFTData:
    train: ListDataset
    val: ListDataset | None
    stats: SFTStats
    val_stats: SFTStats | None
    val_rendered: list[tuple[str, Rendered]]  # held-out prompts/references for generation


def _check_categories(stats: SFTStats, categories: list[str] | None, seen: set[str],
                      path: str) -> None:
    if categories is not None and stats.filtered_category == stats.records:
        present = ", ".join(sorted(seen)[:12]) or "(none: no 'category' field)"
        raise TunesmithError(
            f"sft.category={categories} matched none of the {stats.records} records of {path}; "
            f"categories present: {present}")


def filter_category(formatter: SFTFormatter, records: list[tuple[str, Any]], sft: Any,
                    path: str) -> tuple[list[tuple[str, Any]], int]:
    """Dolly: keep `sft.category` records (before any train/validation split); count the rest.
    A filter that keeps nothing is an error listing the categories that are present."""
    if sft.format != "dolly" or sft.category is None:
        return records, 0
    kept = [(w, r) for w, r in records if formatter.category_of(r) in sft.category]
    if not kept:
        seen = {c for _, r in records if (c := formatter.category_of(r)) is not None}
        stats = SFTStats(records=len(records), filtered_category=len(records))
        _check_categories(stats, sft.category, seen, path)
    return kept, len(records) - len(kept)


def render_split(formatter: SFTFormatter, records: list[tuple[str, Any]], sft: Any,
                  path: str, filtered: int = 0) -> tuple[list[tuple[str, Rendered]], SFTStats]:
    """Render already category-filtered records; `filtered` is counted into the stats."""
    stats = SFTStats(records=filtered, filtered_category=filtered)
    rendered = list(render_records(formatter, records, stats, sft.invalid == "skip"))
    if not rendered:
        why = f"; first problem: {stats.skipped_reasons[0]}" if stats.skipped_reasons else ""
        raise TunesmithError(f"{path}: no usable SFT records ({stats.invalid_skipped} skipped "
                             f"as invalid){why}")
    return rendered, stats


def build_sft_datasets(data: Any, sft: Any, tokenizer: Any, *, seed: int,
                       tokenizer_source: str = "tokenizer") -> SFTData:
    """(train, validation) SFT datasets from `data.path` / `data.validation_path`.

    Without a validation path, `data.validation_split_percentage` of the records are held out
    (seeded). With `sft.packing`, training examples are shuffled (seeded) and packed into rows
    of at most `data.block_size` tokens; validation stays one example per row.
    """
    formatter = SFTFormatter(sft, tokenizer, tokenizer_source, add_eos=data.add_eos)
    tok = SFTTokenizer(tokenizer, data.block_size, train_on_inputs=sft.train_on_inputs,
                       overlong=sft.overlong)
    records = RecordReader(data.path, dataset_config=data.dataset_config,
                           split=data.split, skip_bad_rows=data.skip_bad_rows).read_nonempty()
    records, n_filtered = filter_category(formatter, records, sft, data.path)
    val_records: list[tuple[str, Any]] = []
    val_filtered = 0
    if data.validation_path is not None:
        val_records, val_filtered = filter_category(
            formatter, RecordReader(data.validation_path, skip_bad_rows=data.skip_bad_rows).read_nonempty(),
            sft, data.validation_path)
    elif data.validation_split_percentage > 0:
        train_idx, val_idx = split_indices(len(records), data.validation_split_percentage, seed,
                                           data.path)
        records, val_records = [records[i] for i in train_idx], [records[i] for i in val_idx]
    rendered, stats = render_split(formatter, records, sft, data.path, n_filtered)
    train = tokenize_rendered(tok, rendered, stats)
    if not train:
        raise TunesmithError(f"{data.path}: every example was dropped ({stats.to_dict()})")
    train = train[: data.max_train_samples] if data.max_train_samples else train
    if sft.packing:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        train = list(pack_examples((train[i] for i in order.tolist()), data.block_size))
        stats.packed_rows = len(train)
    val, val_stats, val_rendered = None, None, []
    if val_records:
        val_rendered, val_stats = render_split(formatter, val_records, sft,
                                                data.validation_path or data.path, val_filtered)
        val_examples = tokenize_rendered(tok, val_rendered, val_stats)
        if not val_examples:  # an evaluation over no example would report nothing, silently
            raise TunesmithError(f"{data.validation_path or data.path}: every validation "
                                 f"example was dropped ({val_stats.to_dict()})")
        val = ListDataset(val_examples[: data.max_eval_samples] if data.max_eval_samples
                          else val_examples)
    log.info("sft data: %s", stats.to_dict())
    for reason in stats.skipped_reasons:
        log.warning("skipped record: %s", reason)
    return SFTData(ListDataset(train), val, stats, val_stats, val_rendered)
