"""Structured records (whole JSON objects / table rows) for instruction, chat and summarization
data, read lazily and resumably.

`RecordReader(path).iter_from(position)` yields `(position_after, where, record)`: `where` is
the "file:line" / "file: record i" text every error message names, and `position_after` is a
`RecordPosition` from which reading continues with the *next* record. Positions are small and
JSON-serialisable, so a streaming loader can keep one in its checkpointed state:

    .jsonl / JSON-lines .json / .txt   byte offset of the next line (resume is a seek)
    .json array, .csv, .parquet        index of the next record in the file (resume re-reads
                                       the file up to there: arrays must be parsed whole)

Hub datasets are read with `datasets` (map-style via `load_dataset`, or `streaming=True`), where
the position is the number of records already taken.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tunesmith.data.files import (
    csv_rows,
    list_files,
    looks_like_path,
    read_by_kind,
    utf8_lines,
)
from tunesmith.errors import TunesmithError, first_line


@dataclass(frozen=True)
class RecordPosition:
    """Where the next record starts: file index, its record index, and a byte offset where
    the format allows seeking (-1 otherwise). `index` counts records over all files."""

    file: int = 0
    record: int = 0
    offset: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecordPosition:
        return cls(**{k: int(d[k]) for k in ("file", "record", "offset", "index")})


Item = tuple[RecordPosition, str, Any]  # (position after this record, where, record)


class RecordReader:
    """All records of a local file / directory, or of a hub dataset, in a fixed order."""

    def __init__(self, path: str, *, dataset_config: str | None = None, split: str = "train",
                 streaming_hub: bool = False, skip_bad_rows: bool = False) -> None:
        self.path = path
        self.skip_bad_rows = skip_bad_rows  # CSV rows with the wrong field count
        self.dataset_config = dataset_config
        self.split = split
        self.streaming_hub = streaming_hub
        local = Path(path).expanduser()
        if local.exists():
            self.files: list[Path] | None = list_files(local)
        elif looks_like_path(path):
            raise TunesmithError(f"{local}: no such file or directory")
        else:
            self.files = None  # a hub dataset name

    def iter_from(self, pos: RecordPosition | None = None) -> Iterator[Item]:
        pos = pos or RecordPosition()
        if self.files is None:
            yield from self._iter_hub(pos)
            return
        index = pos.index
        for fi in range(pos.file, len(self.files)):
            start = pos if fi == pos.file else RecordPosition(fi, 0, 0, index)
            for rec_pos, where, rec in _iter_file(self.files[fi], fi, start.record, start.offset,
                                                  self.skip_bad_rows):
                index += 1
                yield RecordPosition(fi, rec_pos[0], rec_pos[1], index), where, rec

    def read_all(self) -> list[tuple[str, Any]]:
        return [(where, rec) for _, where, rec in self.iter_from()]

    def read_nonempty(self) -> list[tuple[str, Any]]:
        """`read_all`, refusing a source without a record (an empty file or folder): a split or
        an evaluation over it would be silently empty."""
        records = self.read_all()
        if not records:
            raise TunesmithError(f"{self.path}: holds no records (an empty file?)")
        return records

    def _iter_hub(self, pos: RecordPosition) -> Iterator[Item]:
        ds = load_hub_dataset(self.path, self.dataset_config, self.split, self.streaming_hub)
        if pos.index:
            ds = ds.skip(pos.index) if self.streaming_hub else ds.select(
                range(pos.index, len(ds)))
        for i, rec in enumerate(ds, start=pos.index):
            yield (RecordPosition(0, i + 1, -1, i + 1),
                   f"dataset '{self.path}': record {i + 1}", rec)


def load_hub_dataset(name: str, config: str | None, split: str, streaming: bool) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, bad split...
        raise TunesmithError(
            f"data path '{name}' does not exist locally and could not be loaded from the Hugging "
            f"Face hub (unreachable or offline?): {first_line(exc)[:200]}"
        ) from exc


# ------------------------------------------------------------------------------ per file
# Each yields ((record index after, byte offset after or -1), where, record).
FileItem = tuple[tuple[int, int], str, Any]


def _iter_file(path: Path, fi: int, record: int, offset: int, skip_bad_rows: bool = False
               ) -> Iterator[FileItem]:
    return read_by_kind(path, {
        "text": lambda fh: _iter_lines(path, fh, record, offset, parse=False),
        "jsonl": lambda fh: _iter_lines(path, fh, record, offset, parse=True),
        "json_array": lambda fh: _iter_json_array(path, fh, record),
        "csv": lambda fh: _iter_csv(path, fh, record, skip_bad_rows),
    }, lambda: _iter_parquet(path, record))


def _iter_lines(path: Path, fh: BinaryIO, record: int, offset: int, parse: bool
                ) -> Iterator[FileItem]:
    """JSON lines (parse=True) or text lines as {"text": line}; resumes by seeking."""
    fh.seek(max(offset, 0))
    pos = max(offset, 0)
    for lineno, line in utf8_lines(path, fh):
        pos += len(line.encode("utf-8")) + (3 if lineno == 1 and pos == 0 and _has_bom(path)
                                            else 0)
        stripped = line.strip()
        if not stripped:
            continue
        # Line numbers are only known when reading from the start (a resume seeks).
        # Records count from 1, like line numbers; `record` is how many came before this one.
        where = f"{path}: record {record + 1}" + (f" (line {lineno})" if offset <= 0 else "")
        if not parse:
            record += 1
            yield (record, pos), where, {"text": line.rstrip("\r\n")}
            continue
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise TunesmithError(f"{where}: malformed JSON line ({exc.msg} at column {exc.colno})"
                                 ) from None
        record += 1
        yield (record, pos), where, obj


def _has_bom(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(3) == b"\xef\xbb\xbf"


def _iter_json_array(path: Path, fh: BinaryIO, start: int) -> Iterator[FileItem]:
    data = fh.read()
    try:
        records = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise TunesmithError(f"{path}: invalid UTF-8 at byte offset {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise TunesmithError(
            f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    del data
    for i in range(start, len(records)):
        yield (i + 1, -1), f"{path}: record {i + 1}", records[i]


def _iter_csv(path: Path, fh: BinaryIO, start: int, skip_bad_rows: bool) -> Iterator[FileItem]:
    # Rows left out by skip_bad_rows do not count, so a resume index stays stable.
    for i, (line, header, row) in enumerate(csv_rows(path, fh, skip_bad_rows)):
        if i >= start:
            yield (i + 1, -1), f"{path}:{line}", dict(zip(header, row))


def _iter_parquet(path: Path, start: int) -> Iterator[FileItem]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise TunesmithError(f"{path}: not a readable parquet file ({exc})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            if i >= start:
                yield (i + 1, -1), f"{path}: row {i + 1}", row
            i += 1
