"""Preference pairs (task=dpo): records -> `{"chosen": Example, "rejected": Example}` -> batches.

A record holds a prompt and two answers, in one of TRL's two preference formats, picked per
record from the field types (no config):

    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  "chosen" / "rejected": lists of {role, content} messages, either whole
                    conversations that differ only in their last (assistant) message, or the
                    answer message(s) after a "prompt" message list (or string: a user turn)

`sft.fields` renames the three fields. Each side is rendered by the SFT renderers, so its tokens
are exactly those SFT would train on for the same conversation: standard records without
`sft.chat_template` as `sft.format=custom` with '{prompt}' / '{response}' (prompt text, then the
answer and EOS); with a template, and conversational records always (default 'tokenizer'),
as a chat whose final assistant turn is the answer. Only the answer is a target, never the
prompt (earlier assistant turns of a conversational prompt included).

Length (`data.block_size`, per side) follows `sft.overlong` per pair: truncate cuts each side
(a side left without a target drops the pair), drop drops the pair, error names file:record.
Pairs whose two sides come out identical carry no preference signal and are dropped; every drop
is counted in `PreferenceStats`.

`PairCollator` turns B pairs into one SFT-style padded batch of 2B rows, interleaved: row 2i is
pair i's chosen, row 2i + 1 its rejected.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith.data import chat
from tunesmith.data.clm import split_indices
from tunesmith.data.records import RecordReader
from tunesmith.data.sft import InvalidRecord, Rendered, SFTFormatter
from tunesmith.data.sft_data import (
    Example,
    ListDataset,
    RecordCounts,
    SFTCollator,
    SFTStats,
    SFTTokenizer,
)
from tunesmith.errors import TunesmithError

log = logging.getLogger("tunesmith")
Pair = dict[str, Example]  # {"chosen": Example, "rejected": Example}
SIDES = ("chosen", "rejected")


@dataclass
class PreferenceStats(RecordCounts):
    """What happened to the preference records (logged, and in the run summary under data)."""

    records: int = 0
    invalid_skipped: int = 0
    truncated: int = 0  # pairs with at least one side cut to data.block_size
    dropped_overlong: int = 0  # sft.overlong=drop: a side longer than data.block_size
    dropped_no_target: int = 0  # truncation left a side without any answer token
    dropped_identical: int = 0  # both sides the same tokens: no preference signal
    pairs: int = 0
    tokens: int = 0  # both sides, padding excluded
    target_tokens: int = 0  # both sides: answer tokens that carry a label
    skipped_reasons: list[str] = field(default_factory=list)  # first few, for the log


# ------------------------------------------------------------------------------ rendering
class PairFormatter:
    """A preference record -> (chosen, rejected) `Rendered`, through `SFTFormatter`."""

    def __init__(self, sft: Any, tokenizer: Any, tokenizer_source: str = "tokenizer",
                 add_eos: bool = True) -> None:
        self.fields = dict(sft.fields)
        self.use_template = sft.chat_template is not None
        self._make = lambda **kw: SFTFormatter(sft.model_copy(update={"fields": {}, **kw}),
                                               tokenizer, tokenizer_source, add_eos)
        self.plain = self._make(format="custom", chat_template=None,
                                prompt_template="{prompt}", response_template="{response}")
        self._chat: SFTFormatter | None = None  # built on first use: it needs a template

    def key(self, name: str) -> str:
        return self.fields.get(name, name)

    def __call__(self, record: Any, where: str) -> tuple[Rendered, Rendered]:
        if not isinstance(record, dict):
            raise InvalidRecord(f"{where}: expected a JSON object, got {type(record).__name__}")
        if any(isinstance(record.get(self.key(n)), list) for n in ("prompt", *SIDES)):
            return self._conversational(record, where)
        prompt = self._field(record, "prompt", where, str)
        answers = [self._field(record, side, where, str) for side in SIDES]
        for side, answer in zip(SIDES, answers):
            if not answer.strip():
                raise InvalidRecord(f"{where}: empty response in field '{self.key(side)}'")
        if not self.use_template:
            c, r = (self.plain({"prompt": prompt, "response": a}, where) for a in answers)
            return c, r
        user = [{"role": "user", "content": prompt}]
        c, r = (self._render(user, [{"role": "assistant", "content": a}], where)
                for a in answers)
        return c, r

    def _field(self, record: dict[str, Any], name: str, where: str, kind: type) -> Any:
        key = self.key(name)
        value = record.get(key)
        if value is None:
            raise InvalidRecord(f"{where}: {'missing' if key not in record else 'null'} "
                                f"field '{key}'")
        if not isinstance(value, kind):
            raise InvalidRecord(f"{where}: field '{key}' holds {type(value).__name__}, expected "
                                f"{'a string' if kind is str else 'a string or a message list'}")
        return value

    def _messages(self, record: dict[str, Any], name: str, where: str,
                  role: str) -> list[dict[str, str]]:
        """A message-list field; a plain string is one message of `role`."""
        value = self._field(record, name, where, (str, list))  # type: ignore[arg-type]
        if isinstance(value, str):
            return [{"role": role, "content": value}]
        try:
            return chat.normalize_messages(value, where, self.key(name),
                                           need_assistant=name != "prompt")
        except TunesmithError as exc:
            raise InvalidRecord(str(exc)) from None

    def _conversational(self, record: dict[str, Any], where: str) -> tuple[Rendered, Rendered]:
        convs = [self._messages(record, side, where, "assistant") for side in SIDES]
        if record.get(self.key("prompt")) is not None:
            prompt = self._messages(record, "prompt", where, "user")
            answers = convs
        else:  # whole conversations: the prompt is everything before the last message
            prompt, answers = convs[0][:-1], [c[-1:] for c in convs]
            if convs[1][:-1] != prompt:
                raise InvalidRecord(
                    f"{where}: fields '{self.key('chosen')}' and '{self.key('rejected')}' must "
                    "be the same conversation up to their last (assistant) message")
        for side, answer in zip(SIDES, answers):
            if answer[-1]["role"] != "assistant":
                raise InvalidRecord(f"{where}: field '{self.key(side)}' must end with an "
                                    "assistant message")
            if not answer[-1]["content"].strip():
                raise InvalidRecord(f"{where}: empty response in field '{self.key(side)}'")
        c, r = (self._render(prompt, answer, where) for answer in answers)
        return c, r

    def _render(self, prompt: list[dict[str, str]], answer: list[dict[str, str]],
                where: str) -> Rendered:
        """The conversation through the chat template, targets on `answer`'s turns only (SFT
        trains every assistant turn; the prompt's own assistant turns are context here)."""
        if self._chat is None:
            self._chat = self._make(format="chat")  # sft.chat_template or 'tokenizer'
        rendered = self._chat({"messages": [*prompt, *answer]}, where)
        # Each assistant turn renders as exactly one trainable segment (chat.py).
        turns = [i for i, (_, trainable) in enumerate(rendered.segments) if trainable]
        n_assistant = sum(m["role"] == "assistant" for m in [*prompt, *answer])
        if len(turns) != n_assistant:
            raise TunesmithError(f"{where}: the chat template rendered {len(turns)} answer "
                                 f"spans for {n_assistant} assistant turns")
        context = set(turns[: sum(m["role"] == "assistant" for m in prompt)])
        rendered.segments = [(text, trainable and i not in context)
                             for i, (text, trainable) in enumerate(rendered.segments)]
        return rendered


# ------------------------------------------------------------------------------ tokenizing
def pair_policy(tok: SFTTokenizer, sides: Sequence[tuple[list[int], list[bool]]], where: str,
                stats: PreferenceStats) -> Pair | None:
    """Both sides through `sft.overlong` (as SFT applies it to one example); None when the
    pair is dropped: a side overlong (drop), without a target after truncation, or both sides
    the same tokens."""
    each = SFTStats()
    kept = [tok.apply_policy(ids, mask, f"{where} ({name})", each)
            for name, (ids, mask) in zip(SIDES, sides)]
    chosen, rejected = kept
    stats.truncated += bool(each.truncated)  # as SFT: also when the cut then drops the pair
    if chosen is None or rejected is None:
        if each.dropped_overlong:
            stats.dropped_overlong += 1
        else:
            stats.dropped_no_target += 1
        return None
    if chosen["input_ids"] == rejected["input_ids"]:
        stats.dropped_identical += 1
        return None
    stats.pairs += 1
    stats.tokens += each.tokens
    stats.target_tokens += each.target_tokens
    return {"chosen": chosen, "rejected": rejected}


def build_pairs(formatter: PairFormatter, tok: SFTTokenizer, records: list[tuple[str, Any]],
                skip_invalid: bool, path: str, batch_size: int = 128
                ) -> tuple[list[Pair], PreferenceStats]:
    """Render, tokenize and length-check every record; invalid ones raise or are counted."""
    stats = PreferenceStats()
    rendered: list[tuple[str, tuple[Rendered, Rendered]]] = []
    for where, rec in records:
        stats.records += 1
        try:
            rendered.append((where, formatter(rec, where)))
        except InvalidRecord as exc:
            if not skip_invalid:
                raise exc.with_skip_hint() from exc
            stats.note_skip(str(exc))
    if not rendered:
        why = f"; first problem: {stats.skipped_reasons[0]}" if stats.skipped_reasons else ""
        raise TunesmithError(f"{path}: no usable preference records ({stats.invalid_skipped} "
                             f"skipped as invalid){why}")
    pairs: list[Pair] = []
    for start in range(0, len(rendered), batch_size):
        chunk = rendered[start : start + batch_size]
        encoded = tok.encode([side for _, both in chunk for side in both])  # c0, r0, c1, r1...
        for k, (where, _) in enumerate(chunk):
            pair = pair_policy(tok, encoded[2 * k : 2 * k + 2], where, stats)
            if pair is not None:
                pairs.append(pair)
    return pairs, stats


# ------------------------------------------------------------------------------ datasets
@dataclass
class PreferenceData:
    train: ListDataset  # of Pair
    val: ListDataset | None
    stats: PreferenceStats
    val_stats: PreferenceStats | None


def build_preference_datasets(data: Any, sft: Any, tokenizer: Any, *, seed: int,
                              tokenizer_source: str = "tokenizer") -> PreferenceData:
    """(train, validation) pair datasets from `data.path` / `data.validation_path`, or
    `data.validation_split_percentage` of the records held out (seeded), as SFT splits."""
    if sft.train_on_inputs:
        raise TunesmithError("task=dpo never trains on prompts: set sft.train_on_inputs=false")
    formatter = PairFormatter(sft, tokenizer, tokenizer_source, add_eos=data.add_eos)
    tok = SFTTokenizer(tokenizer, data.block_size, overlong=sft.overlong)
    records = RecordReader(data.path, dataset_config=data.dataset_config, split=data.split,
                           skip_bad_rows=data.skip_bad_rows).read_nonempty()
    val_records: list[tuple[str, Any]] = []
    if data.validation_path is not None:
        val_records = RecordReader(data.validation_path,
                                   skip_bad_rows=data.skip_bad_rows).read_nonempty()
    elif data.validation_split_percentage > 0:
        train_idx, val_idx = split_indices(len(records), data.validation_split_percentage, seed,
                                           data.path)
        records, val_records = [records[i] for i in train_idx], [records[i] for i in val_idx]
    skip = sft.invalid == "skip"
    train, stats = build_pairs(formatter, tok, records, skip, data.path)
    _log_stats("train", stats)
    if not train:
        raise TunesmithError(f"{data.path}: every preference pair was dropped ({stats.to_dict()})")
    train = train[: data.max_train_samples] if data.max_train_samples else train
    val, val_stats = None, None
    if val_records:
        val_pairs, val_stats = build_pairs(formatter, tok, val_records, skip,
                                           data.validation_path or data.path)
        _log_stats("validation", val_stats)
        if not val_pairs:  # an evaluation over no pair would report nothing, silently
            raise TunesmithError(f"{data.validation_path or data.path}: every validation "
                                 f"preference pair was dropped ({val_stats.to_dict()})")
        val = ListDataset(val_pairs[: data.max_eval_samples] if data.max_eval_samples
                          else val_pairs)
    return PreferenceData(ListDataset(train), val, stats, val_stats)


def _log_stats(split: str, stats: PreferenceStats) -> None:
    log.info("dpo %s data: %s", split, stats.to_dict())
    if stats.dropped_identical:
        log.warning("dpo %s data: dropped %d pairs whose chosen and rejected sides are the "
                    "same tokens (no preference signal)", split, stats.dropped_identical)
    for reason in stats.skipped_reasons:
        log.warning("skipped record: %s", reason)


# ------------------------------------------------------------------------------ collator
class PairCollator:
    """B pairs -> one padded batch of 2B rows by `SFTCollator` (same keys, shift, padding).

    Rows are interleaved: row 2i is pair i's chosen, row 2i + 1 its rejected, so
    `batch[k][0::2]` / `batch[k][1::2]` are the [B, T] chosen / rejected halves. Output:
    input_ids [2B, T], labels [2B, T] (already shifted, -100 where no target), and
    attention_mask [2B, T] when any row is padded (as SFT batches).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.rows = SFTCollator(pad_token_id, pad_to_multiple_of)

    def __call__(self, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
        return self.rows([pair[side] for pair in pairs for side in SIDES])
