"""Local data files: which files a path names, what kind each is, and reading them safely.

The one file-type dispatcher (`read_by_kind`) and the pieces both readers of local files share:
the text loader (`data.sources`, records for CLM/MLM) and the record reader (`data.records`,
SFT and streaming). Every problem is one `TunesmithError` naming the file (and line).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, TypeVar

from tunesmith.errors import TunesmithError

T = TypeVar("T")
log = logging.getLogger("tunesmith")

# Plain text; .raw/.tokens are WikiText's names for plain text files.
TEXT_SUFFIXES = (".txt", ".raw", ".tokens")
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".json", ".jsonl", ".csv", ".parquet")
_SUFFIX_LIST = ".txt (.raw, .tokens), .json, .jsonl, .csv, .parquet"


def _check_file(path: Path) -> None:
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise TunesmithError(
            f"{path}: unsupported file type '{path.suffix or '(none)'}' (expected {_SUFFIX_LIST} "
            "or a directory of them)"
        )
    if not os.access(path, os.R_OK):
        raise TunesmithError(f"{path}: file is not readable (permission denied)")


def list_files(path: Path) -> list[Path]:
    """The data files behind `path`: itself, or the supported files under a directory."""
    if path.is_file():
        _check_file(path)
        return [path]
    if not path.is_dir():
        raise TunesmithError(f"{path}: no such file or directory")
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise TunesmithError(f"{path}: directory holds no {_SUFFIX_LIST} files")
    for f in files:
        _check_file(f)
    return files


def looks_like_path(name: str) -> bool:
    """A name that can only be a filesystem path: it has a file suffix or a path prefix."""
    return (
        Path(name).suffix.lower() in SUPPORTED_SUFFIXES
        or name.startswith(("/", "./", "../", "~", ".\\"))
        or "\\" in name
        or name.count("/") > 1
    )


def utf8_lines(path: Path, fh: BinaryIO) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, decoded line with its line break), checking UTF-8 per line."""
    offset = 0
    for lineno, raw in enumerate(fh, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TunesmithError(
                f"{path}:{lineno}: invalid UTF-8 at byte offset {offset + exc.start} "
                "(re-encode the file as UTF-8)"
            ) from None
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]  # a UTF-8 byte-order mark is not text
        offset += len(raw)
        yield lineno, line


def first_significant_byte(fh: BinaryIO) -> bytes:
    """The first non-whitespace byte after an optional BOM (b'' for an empty file); rewinds."""
    head = fh.read(4096)
    while head:
        stripped = head.lstrip(b" \t\r\n")
        if stripped.startswith(b"\xef\xbb\xbf"):
            stripped = stripped[3:].lstrip(b" \t\r\n")
        if stripped:
            fh.seek(0)
            return stripped[:1]
        head = fh.read(4096)
    fh.seek(0)
    return b""


def csv_rows(path: Path, fh: BinaryIO, skip_bad_rows: bool = False
             ) -> Iterator[tuple[int, list[str], list[str]]]:
    """(line, header, row) for every data row of a CSV file; the header row is not yielded.

    A row whose field count differs from the header's is an error naming `file:line`, or, with
    `skip_bad_rows` (`data.csv_bad_rows: skip`), left out and counted in one warning per file.
    """
    # csv needs the raw line endings (newline="" semantics) to handle quoted multi-line fields.
    reader = csv.reader(line for _, line in utf8_lines(path, fh))
    old_limit = csv.field_size_limit()
    csv.field_size_limit(max(old_limit, 2**31 - 1))  # documents can exceed the 128 KiB default
    skipped: list[int] = []
    try:
        header = next(reader, None)
        if header is None:
            return
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                if not skip_bad_rows:
                    raise TunesmithError(
                        f"{path}:{reader.line_num}: row has {len(row)} fields, the header has "
                        f"{len(header)} (fix the row, or set data.csv_bad_rows=skip to leave such "
                        "rows out)"
                    )
                skipped.append(reader.line_num)
                continue
            yield reader.line_num, header, row
    except csv.Error as exc:
        raise TunesmithError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    finally:
        csv.field_size_limit(old_limit)
    if skipped:
        log.warning("%s: skipped %d row(s) whose field count differs from the header "
                    "(data.csv_bad_rows=skip), first at line %d", path, len(skipped), skipped[0])


def read_by_kind(path: Path, readers: Mapping[str, Callable[[BinaryIO], Iterator[T]]],
                 parquet: Callable[[], Iterator[T]]) -> Iterator[T]:
    """The one file-type dispatcher, shared by the text loader (`data.sources`) and `data.records`.

    Kinds: "text" (.txt/.raw/.tokens), "jsonl" (.jsonl, or a .json that is not an array),
    "json_array" (a .json array), "csv"; `parquet` reads .parquet (no open handle needed).
    A read error is one clear line naming the file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from parquet()
        return
    try:
        with open(path, "rb") as fh:
            if suffix in TEXT_SUFFIXES:
                kind = "text"
            elif suffix == ".jsonl" or (suffix == ".json" and first_significant_byte(fh) != b"["):
                kind = "jsonl"
            elif suffix == ".json":
                kind = "json_array"
            else:
                kind = "csv"
            yield from readers[kind](fh)
    except OSError as exc:
        raise TunesmithError(f"{path}: cannot read ({exc.strerror or exc})") from None
