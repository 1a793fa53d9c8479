"""Raw text records from local files or a Hugging Face dataset.

`load_text_records` returns a `datasets.Dataset` with a `text` column (str) and, for local files,
a `doc_end` column (bool): True when the record ends a document, i.e. where an EOS belongs in
packed mode.

Plain text (.txt, and WikiText's .raw/.tokens) follows the Hugging Face `text` builder that
`run_clm.py` uses, so perplexities are comparable: universal newlines ("\\r\\n" and "\\r" become
"\\n"), one record per line, empty lines kept, and line breaks kept when `keep_linebreaks`
(run_clm's default). A .txt file is ONE document: only its last line has `doc_end=True`, so packed
mode puts one EOS per file rather than one per line (an EOS after every verse line would teach the
model to stop after each line); with add_eos=false the token stream equals run_clm's. Every record
of a .json/.jsonl/.csv/.parquet file or a hub dataset is its own document.

Local files are parsed line by line (except a .json *array*, which must be read whole) and written
to an Arrow file in the cache, keyed by path, size and mtime, so a large file is parsed once and
later runs memory-map it. Every problem is one `TunesmithError` naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import datasets
import pyarrow as pa

from tunesmith.data.files import (
    csv_rows,
    list_files,
    looks_like_path,
    read_by_kind,
    utf8_lines,
)
from tunesmith.errors import TunesmithError

# Bump when the record layout or parsing rules change, so old cached records are not reused.
_RECORDS_VERSION = "2"  # 2: CSV rows must have the header's field count

log = logging.getLogger("tunesmith")
_FEATURES = datasets.Features({"text": datasets.Value("string"), "doc_end": datasets.Value("bool")})
# Flush a record batch after this many records or characters (bounds memory for huge files).
_BATCH_RECORDS = 8192
_BATCH_CHARS = 64 << 20

Record = tuple[str, bool]  # (text, doc_end)


def cache_root(cache_dir: str | None) -> Path:
    """Where tunesmith keeps records and packed blocks: `cache_dir` or the HF datasets cache."""
    base = Path(cache_dir).expanduser() if cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    return base / "tunesmith"


# ----------------------------------------------------------------------------- readers


def _split_universal(line: str) -> list[str]:
    """Split like Python text mode + StringIO.readlines: \\r\\n and \\r become \\n, ends kept."""
    if "\r" in line:
        line = line.replace("\r\n", "\n").replace("\r", "\n")
    if line.count("\n") <= 1:
        return [line]
    parts = line.split("\n")
    pieces = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        pieces.append(parts[-1])
    return pieces


def _read_txt(path: Path, fh: BinaryIO, keep_linebreaks: bool) -> Iterator[Record]:
    pending: str | None = None  # held back one line so the file's last line gets doc_end=True
    for _, line in utf8_lines(path, fh):
        for piece in _split_universal(line):
            if pending is not None:
                yield pending, False
            pending = piece if keep_linebreaks else piece.rstrip("\n")
    if pending is not None:
        yield pending, True


def _columns_error(path: Path, where: str, column: str, present: list[str]) -> TunesmithError:
    cols = ", ".join(present) if present else "(none)"
    return TunesmithError(
        f"{where}: text column '{column}' not found; columns present: {cols} "
        "(set data.text_column; `tunesmith eval`: --text-column)"
    )


def _text_of(obj: Any, path: Path, where: str, column: str) -> str:
    """The text field of one JSON record, or a one-line error saying what is wrong and where."""
    if not isinstance(obj, dict):
        raise TunesmithError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if column not in obj:
        raise _columns_error(path, where, column, list(obj))
    text = obj[column]
    if not isinstance(text, str):
        raise TunesmithError(
            f"{where}: column '{column}' holds {type(text).__name__}, expected a string"
        )
    return text


def _read_jsonl(path: Path, fh: BinaryIO, column: str) -> Iterator[Record]:
    for lineno, line in utf8_lines(path, fh):
        stripped = line.strip()
        if not stripped:
            continue
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise TunesmithError(
                f"{path}:{lineno}: malformed JSON line ({exc.msg} at column {exc.colno})"
            ) from None
        yield _text_of(obj, path, f"{path}:{lineno}", column), True


def _read_json(path: Path, fh: BinaryIO, column: str) -> Iterator[Record]:
    """A .json array of objects, read whole (`read_by_kind` sends JSON lines to `_read_jsonl`)."""
    data = fh.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TunesmithError(
            f"{path}:{line}: invalid UTF-8 at byte offset {exc.start} (re-encode the file as UTF-8)"
        ) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TunesmithError(
            f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
        ) from None
    del data, text
    for i, obj in enumerate(records):
        yield _text_of(obj, path, f"{path}: record {i + 1}", column), True


def _read_csv(path: Path, fh: BinaryIO, column: str, skip_bad_rows: bool) -> Iterator[Record]:
    header: list[str] | None = None
    for _, head, row in csv_rows(path, fh, skip_bad_rows):
        if header is None:
            header = head
            if column not in header:
                raise _columns_error(path, str(path), column, header)
        yield row[header.index(column)], True


def _read_parquet(path: Path, column: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise TunesmithError(f"{path}: not a readable parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise _columns_error(path, str(path), column, names)
    _check_string_type(pf.schema_arrow.field(column).type, f"{path}", column)
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=_BATCH_RECORDS):
        arr = batch.column(0)
        if arr.null_count:
            first = arr.is_null().to_pylist().index(True)
            raise TunesmithError(f"{path}: row {row + first + 1}: column '{column}' is null")
        row += len(arr)
        for text in arr.to_pylist():
            yield text, True


def _check_string_type(typ: pa.DataType, where: str, column: str) -> None:
    ok = pa.types.is_string(typ) or pa.types.is_large_string(typ)
    ok = ok or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(typ))
    if not ok:
        raise TunesmithError(f"{where}: column '{column}' has type {typ}, expected strings")


def _read_file(path: Path, column: str, keep_linebreaks: bool, skip_bad_rows: bool = False
               ) -> Iterator[Record]:
    return read_by_kind(path, {
        "text": lambda fh: _read_txt(path, fh, keep_linebreaks),
        "jsonl": lambda fh: _read_jsonl(path, fh, column),
        "json_array": lambda fh: _read_json(path, fh, column),
        "csv": lambda fh: _read_csv(path, fh, column, skip_bad_rows),
    }, lambda: _read_parquet(path, column))


# ----------------------------------------------------------------------------- arrow cache


def _records_fingerprint(files: list[Path], column: str, keep_linebreaks: bool,
                         skip_bad_rows: bool = False) -> str:
    """Keyed by what the records depend on, including size and mtime so edits invalidate."""
    digest = hashlib.sha256(
        f"records-v{_RECORDS_VERSION}|{column}|{keep_linebreaks}|{skip_bad_rows}".encode())
    for f in files:
        st = f.stat()
        digest.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def _write_records(records: Iterator[Record], out: Path) -> int:
    """Stream records into an Arrow IPC file (the format `Dataset.from_file` maps); count them."""
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    schema = _FEATURES.arrow_schema
    texts: list[str] = []
    ends: list[bool] = []
    n = chars = 0
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for text, end in records:
                texts.append(text)
                ends.append(end)
                chars += len(text)
                if len(texts) >= _BATCH_RECORDS or chars >= _BATCH_CHARS:
                    writer.write_batch(pa.record_batch([texts, ends], schema=schema))
                    n += len(texts)
                    texts, ends, chars = [], [], 0
            if texts:
                writer.write_batch(pa.record_batch([texts, ends], schema=schema))
                n += len(texts)
        if n:
            os.replace(tmp, out)  # atomic: a crash or a concurrent rank never sees half a file
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _load_local(
    path: Path, column: str, keep_linebreaks: bool, cache_dir: str | None, skip_bad_rows: bool
) -> datasets.Dataset:
    files = list_files(path)
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    fingerprint = _records_fingerprint(files, column, keep_linebreaks, skip_bad_rows)
    out = root / f"records-{fingerprint}.arrow"
    if not out.exists():
        stream = (rec for f in files for rec in _read_file(f, column, keep_linebreaks, skip_bad_rows))
        if _write_records(stream, out) == 0:
            raise TunesmithError(f"{path}: no records found (empty dataset)")
    return datasets.Dataset.from_file(str(out))


# ----------------------------------------------------------------------------- hub datasets


def _load_hub(
    name: str, config: str | None, split: str, column: str, cache_dir: str | None
) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, bad split...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunesmithError(
            f"data path '{name}' does not exist locally and could not be loaded from the Hugging "
            f"Face hub (unreachable or offline?): {reason[:200]}"
        ) from exc
    if not isinstance(ds, datasets.Dataset):
        raise TunesmithError(f"dataset '{name}' split '{split}' is not a map-style dataset")
    if column not in ds.column_names:
        raise _columns_error(Path(name), f"dataset '{name}'", column, ds.column_names)
    _check_string_type(ds.data.schema.field(column).type, f"dataset '{name}'", column)
    if ds.data.column(column).null_count:
        raise TunesmithError(f"dataset '{name}': column '{column}' has null values")
    if len(ds) == 0:
        raise TunesmithError(f"dataset '{name}' split '{split}' is empty")
    ds = ds.select_columns([column])
    return ds if column == "text" else ds.rename_column(column, "text")


def load_text_records(
    path: str,
    *,
    text_column: str = "text",
    keep_linebreaks: bool = True,
    dataset_config: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    skip_bad_rows: bool = False,
) -> datasets.Dataset:
    """Records of `path` (file, directory or hub name) as a Dataset with column `text`.

    Local sources also have `doc_end` (bool). `text_column` selects the field of
    json/jsonl/csv/parquet/hub records; .txt files have no columns. `keep_linebreaks=False`
    strips the line break of each .txt line (lines mode). `skip_bad_rows` leaves out CSV rows
    with the wrong field count instead of failing.
    """
    local = Path(path).expanduser()
    if local.exists():
        return _load_local(local, text_column, keep_linebreaks, cache_dir, skip_bad_rows)
    if looks_like_path(path):
        raise TunesmithError(f"{local}: no such file or directory")
    return _load_hub(path, dataset_config, split, text_column, cache_dir)
