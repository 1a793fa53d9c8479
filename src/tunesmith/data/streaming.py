"""A resumable streaming loader: records are read lazily, never tokenized up front.

Pipeline, one epoch = one pass over the source:

    RecordReader (local files lazily, or a hub dataset with streaming=True)
      -> rank shard: record i goes to rank i % world_size
      -> shuffle buffer of `shuffle_buffer` records (seeded by seed + epoch)
      -> encode (tokenize; SFT records may be skipped or dropped by policy)
      -> units: "blocks" (concatenate token lists, cut into block_size blocks: raw-text CLM),
                "examples" (one example per batch row: SFT / line-by-line),
                "packed" (next-fit rows of several SFT examples, with doc_ids)
      -> batches of batch_size -> collate_fn

Exact resume: everything that determines the rest of the stream is small host state, kept
between batches and returned by `state_dict()`: the source position (a byte offset or record
count), the shuffle buffer's records, the RNG state, and the carried tokens / open packed row.
`load_state_dict()` restores it and iteration continues with exactly the next batch. The
generator does no work past a yield, so the state read between batches is exact.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

from tunesmith.data.records import RecordPosition, RecordReader
from tunesmith.errors import TunesmithError

_STATE_VERSION = 1
MODES = ("blocks", "examples", "packed")


class StreamingLoader:
    """Batches from a record stream for one data-parallel rank, resumable mid-epoch."""

    def __init__(
        self,
        reader: RecordReader,
        encode: Callable[[Any, str], Any],
        *,
        mode: str,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any],
        block_size: int,
        seed: int = 0,
        shuffle_buffer: int = 10000,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.reader = reader
        self.encode = encode  # record, where -> token list (blocks) / example / None (skip)
        self.mode = mode
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.block_size = block_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._reset()

    # ---------------------------------------------------------------- state
    def _reset(self) -> None:
        self.batches_done = 0
        self.position = RecordPosition()
        self.buffer: list[tuple[str, Any]] = []
        self.carry: list[int] = []  # blocks: tokens waiting to fill a block
        self.open_row: dict[str, list[Any]] | None = None  # packed: row being filled
        self.exhausted = False  # source fully read this epoch
        self.finished = False  # epoch fully handed out
        self.rng = random.Random(self.seed * 1_000_003 + self.epoch)
        self._source: Iterator[Any] | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._reset()

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "version": _STATE_VERSION, "epoch": self.epoch, "batches_done": self.batches_done,
            "position": self.position.to_dict(), "buffer": [list(x) for x in self.buffer],
            "carry": list(self.carry), "open_row": self.open_row, "exhausted": self.exhausted,
            "finished": self.finished, "rng": [version, list(internal), gauss],
            "seed": self.seed, "world_size": self.world_size, "rank": self.rank,
            "batch_size": self.batch_size, "block_size": self.block_size, "mode": self.mode,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "world_size", "rank", "batch_size", "block_size", "mode",
                    "shuffle_buffer"):
            if key in state and state[key] != mine[key]:
                raise TunesmithError(
                    f"cannot resume the data stream exactly: {key} was {state[key]} in the "
                    f"checkpoint and is {mine[key]} now")
        self.epoch = int(state["epoch"])
        self._reset()
        self.batches_done = int(state["batches_done"])
        self.position = RecordPosition.from_dict(state["position"])
        self.buffer = [(w, r) for w, r in state["buffer"]]
        self.carry = list(state["carry"])
        self.open_row = state["open_row"]
        self.exhausted = bool(state["exhausted"])
        self.finished = bool(state["finished"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    # ---------------------------------------------------------------- records
    def _read(self) -> tuple[str, Any] | None:
        """Next record of this rank from the source (None at its end); advances position."""
        if self._source is None:
            self._source = self.reader.iter_from(self.position)
        for pos, where, rec in self._source:
            self.position = pos
            if (pos.index - 1) % self.world_size == self.rank:
                return where, rec
        self.exhausted = True
        return None

    def _next_record(self) -> tuple[str, Any] | None:
        """Next record after shuffling through the buffer."""
        if self.shuffle_buffer <= 1:
            return None if self.exhausted else self._read()
        while not self.exhausted and len(self.buffer) < self.shuffle_buffer:
            item = self._read()
            if item is not None:
                self.buffer.append(item)
        if not self.buffer:
            return None
        j = self.rng.randrange(len(self.buffer))
        out = self.buffer[j]
        replacement = None if self.exhausted else self._read()
        if replacement is not None:
            self.buffer[j] = replacement
        else:
            self.buffer[j] = self.buffer[-1]
            self.buffer.pop()
        return out

    # ---------------------------------------------------------------- units
    def _next_unit(self) -> Any:
        """Next batch row, or None at the end of the epoch."""
        if self.mode == "blocks":
            while len(self.carry) < self.block_size:
                item = self._next_record()
                if item is None:
                    return None  # the last partial block is dropped, as in packed CLM
                self.carry.extend(self.encode(item[1], item[0]) or [])
            block, self.carry = self.carry[: self.block_size], self.carry[self.block_size :]
            return {"input_ids": block}
        while True:
            item = self._next_record()
            if item is None:
                row, self.open_row = self.open_row, None
                return row
            ex = self.encode(item[1], item[0])
            if ex is None:
                continue
            if self.mode == "examples":
                return ex
            row = self._add_to_row(ex)
            if row is not None:
                return row

    def _add_to_row(self, ex: dict[str, Any]) -> dict[str, Any] | None:
        """Next-fit packing: returns the finished row when `ex` does not fit the open one."""
        full = None
        n = len(ex["input_ids"])
        if self.open_row is not None and len(self.open_row["input_ids"]) + n > self.block_size:
            full, self.open_row = self.open_row, None
        if self.open_row is None:
            self.open_row = {"input_ids": [], "loss_mask": [], "doc_ids": []}
        doc = (self.open_row["doc_ids"][-1] + 1) if self.open_row["doc_ids"] else 0
        self.open_row["input_ids"].extend(ex["input_ids"])
        self.open_row["loss_mask"].extend(ex["loss_mask"])
        self.open_row["doc_ids"].extend([doc] * n)
        return full

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Any]:
        if self.finished:  # previous epoch handed out completely: roll over
            self.epoch += 1
            self._reset()
        while True:
            rows = []
            while len(rows) < self.batch_size:
                unit = self._next_unit()
                if unit is None:
                    break
                rows.append(unit)
            if len(rows) < self.batch_size:
                self.finished = True
                if rows and not self.drop_last:
                    self.batches_done += 1
                    yield self.collate_fn(rows)
                if self.batches_done == 0:
                    raise TunesmithError(
                        f"data stream {self.reader.path} gives no full batch of "
                        f"{self.batch_size} on rank {self.rank}; add data or lower the batch size")
                return
            self.batches_done += 1  # counted before the yield, as StatefulLoader does
            yield self.collate_fn(rows)
