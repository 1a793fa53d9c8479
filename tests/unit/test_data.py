"""Tokenizer loading, raw-text sources, CLM datasets, collators and the resumable loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tunesmith.config.schema import DataConfig
from tunesmith.data import StatefulLoader, build_clm_datasets, load_tokenizer, make_collator
from tunesmith.data.clm import split_indices
from tunesmith.data.collate import PackedCollator, PaddedCollator
from tunesmith.data.sources import load_text_records
from tunesmith.errors import TunesmithError

SHARED = Path(__file__).resolve().parents[2].parent / "shared/data"
NO_TEXT = "text column 'text' not found; columns present"

DOCS = [
    "hello world",
    "the quick brown fox",
    "",
    "jumps over the lazy dog\nsecond line",
    "caf\u00e9 \u00fcber na\u00efve",
]


def shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A byte-level BPE trained here (vocab 300) with <s>/</s>, saved and loaded back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(DOCS * 10, trainer)
    out = tmp_path_factory.mktemp("tinytok")
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(
        str(out)
    )
    return load_tokenizer(str(out))


def cfg_for(path: Path | str, tmp_path: Path, **kw: Any) -> DataConfig:
    base: dict[str, Any] = {
        "path": str(path),
        "cache_dir": str(tmp_path / "cache"),
        "block_size": 8,
        "validation_split_percentage": 0,
    }
    return DataConfig(**{**base, **kw})


def write_jsonl(path: Path, texts: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def ids_of(ds: Any) -> list[list[int]]:
    return [list(r) for r in ds["input_ids"]]


# ------------------------------------------------------------------------------ tokenizer


@pytest.mark.shared
@pytest.mark.parametrize("name", ["gpt2", "llama2", "llama3"])
def test_real_tokenizers_get_pad_eos(name: str) -> None:
    tok = load_tokenizer(str(shared(f"tokenizers/{name}/hf")))
    assert tok.eos_token is not None
    assert tok.pad_token_id is not None
    if name == "gpt2":  # gpt2 ships no pad token: pad = eos is added
        assert tok.pad_token == tok.eos_token == "<|endoftext|>"
        assert tok("Hello world")["input_ids"] == [15496, 995]


@pytest.mark.shared
def test_bare_sentencepiece_dir_loads_or_explains() -> None:
    path = shared("tokenizers/llama2/tokenizer.model").parent
    try:
        tok = load_tokenizer(str(path))
    except TunesmithError as exc:  # no `protobuf` installed: the error says what is missing
        assert "protobuf" in str(exc) and "\n" not in str(exc)
    else:
        assert tok("Hello world")["input_ids"] == [1, 15043, 3186]


def test_tokenizer_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TunesmithError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope" / "tok"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunesmithError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TunesmithError, match="could not load a tokenizer from"):
        load_tokenizer(str(tmp_path / "bad"))
    _force_offline(monkeypatch)
    with pytest.raises(TunesmithError, match="not a local directory and could not be loaded"):
        load_tokenizer("someorg/no-such-tokenizer")


def _force_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail hub calls at once instead of after network retries."""
    import datasets
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.mark.shared
def test_llama2_adds_bos_per_document(tmp_path: Path) -> None:
    tok = load_tokenizer(str(shared("tokenizers/llama2/hf")))
    docs = ["Hello world", "The cat sat.", "Last one here"]
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", docs), tmp_path, block_size=4)
    train, _ = build_clm_datasets(cfg, tok, seed=0, max_positions=4096)
    stream = [t for block in ids_of(train) for t in block]
    expected = [t for d in docs for t in tok(d)["input_ids"] + [tok.eos_token_id]]
    assert expected[0] == tok.bos_token_id == 1
    assert expected.count(1) == len(docs) and expected.count(2) == len(docs)  # BOS, EOS per doc
    assert stream == expected[: len(stream)] and len(stream) == len(expected) // 4 * 4


# ------------------------------------------------------------------------------ sources


def _make_source(kind: str, tmp_path: Path, texts: list[str]) -> Path:
    if kind == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", texts)
    if kind == "json-list":
        (tmp_path / "d.json").write_text(json.dumps([{"text": t} for t in texts], indent=2))
        return tmp_path / "d.json"
    if kind == "json-lines":
        return write_jsonl(tmp_path / "d.json", texts)
    if kind == "csv":
        import csv

        with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "text"])
            writer.writerows([i, t] for i, t in enumerate(texts))
        return tmp_path / "d.csv"
    if kind == "parquet":
        table = pa.table({"text": texts, "n": list(range(len(texts)))})
        pq.write_table(table, tmp_path / "d.parquet")
        return tmp_path / "d.parquet"
    assert kind == "dir"
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "dir" / "a.jsonl", texts[:2])
    write_jsonl(tmp_path / "dir" / "sub" / "b.jsonl", texts[2:])
    (tmp_path / "dir" / ".hidden.jsonl").write_text("garbage\n")
    return tmp_path / "dir"


@pytest.mark.parametrize("kind", ["jsonl", "json-list", "json-lines", "csv", "parquet", "dir"])
def test_record_formats(kind: str, tmp_path: Path) -> None:
    path = _make_source(kind, tmp_path, DOCS)
    ds = load_text_records(str(path), cache_dir=str(tmp_path / "c"))
    assert ds["text"] == DOCS
    assert ds["doc_end"] == [True] * len(DOCS)  # every record is a document


def test_txt_lines_universal_newlines(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffone\r\n\r\ntwo\rthree\n caf\u00e9".encode())
    ds = load_text_records(str(path), cache_dir=str(tmp_path / "c"))
    assert ds["text"] == ["one\n", "\n", "two\n", "three\n", " caf\u00e9"]
    assert ds["doc_end"] == [False, False, False, False, True]  # the file is one document
    stripped = load_text_records(str(path), keep_linebreaks=False, cache_dir=str(tmp_path / "c"))
    assert stripped["text"] == ["one", "", "two", "three", " caf\u00e9"]


@pytest.mark.shared
def test_crlf_wikitext_matches_hf_text_builder(tmp_path: Path) -> None:
    import datasets

    path = shared("text/wikitext-2/wiki.valid.raw")
    ours = load_text_records(str(path), cache_dir=str(tmp_path / "c"))
    ref = datasets.load_dataset(
        "text",
        data_files=str(path),
        keep_linebreaks=True,
        split="train",
        cache_dir=str(tmp_path / "h"),
    )
    assert len(ours) == 3760 and ours["text"] == ref["text"]
    assert not any("\r" in t for t in ours["text"])


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("e.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": x}\n', r"e\.jsonl:3: malformed JSON"),
        ("e.json", b'[{"text": "a"},\n {"text": }]', r"e\.json:2: malformed JSON"),
        ("e.jsonl", b'{"text": "a"}\n["x"]\n', r"e\.jsonl:2: expected a JSON object, got list"),
        ("e.jsonl", b'{"text": 3}\n', r"e\.jsonl:1: column 'text' holds int"),
        ("e.jsonl", b'{"body": "a", "id": 1}\n', rf"e\.jsonl:1: {NO_TEXT}: body, id"),
        ("e.json", b'[{"body": "a"}]', rf"e\.json: record 1: {NO_TEXT}: body"),
        ("e.csv", b"id,body\n1,a\n", rf"e\.csv: {NO_TEXT}: id, body"),
        ("e.txt", b"fine\nalso fine\nbad \xff\n", r"e\.txt:3: invalid UTF-8 at byte offset 19"),
        ("e.jsonl", b'{"text": "ok"}\n{"text": "\xc3("}\n', r"e\.jsonl:2: invalid UTF-8"),
        ("e.json", b'[\n{"text": "\xe9"}]', r"e\.json:2: invalid UTF-8"),
        ("e.txt", b"", r"e\.txt: no records found \(empty dataset\)"),
        ("e.csv", b"text\n", r"e\.csv: no records found"),
        ("e.xml", b"<a/>", r"e\.xml: unsupported file type '\.xml'"),
        ("e.parquet", b"not parquet", r"e\.parquet: not a readable parquet file"),
    ],
)
def test_bad_inputs(name: str, content: bytes, pattern: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TunesmithError, match=pattern) as info:
        load_text_records(str(path), cache_dir=str(tmp_path / "c"))
    assert "\n" not in str(info.value)  # one line


def test_bad_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(TunesmithError, match=rf"p\.parquet: {NO_TEXT}: body"):
        load_text_records(str(tmp_path / "p.parquet"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(TunesmithError, match=r"missing\.jsonl: no such file or directory"):
        load_text_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("x")
    with pytest.raises(TunesmithError, match="directory holds no"):
        load_text_records(str(tmp_path / "d"))
    _force_offline(monkeypatch)
    with pytest.raises(TunesmithError, match="does not exist locally and could not be loaded"):
        load_text_records("someorg/no-such-dataset", cache_dir=str(tmp_path / "c"))


def test_hub_dataset_records(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[Any, ...]] = []

    def fake_load(name: str, config: str | None, *, split: str, cache_dir: str | None) -> Any:
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"body": ["a", "b"], "n": [1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = load_text_records("org/ds", text_column="body", dataset_config="c", split="validation")
    assert ds.column_names == ["text"] and ds["text"] == ["a", "b"]
    assert calls == [("org/ds", "c", "validation")]
    with pytest.raises(TunesmithError, match=f"'org/ds': {NO_TEXT}: body, n"):
        load_text_records("org/ds")


# ------------------------------------------------------------------------------ datasets


def _stream(tok: Any, texts: list[str], eos: bool = True) -> list[int]:
    return [t for x in texts for t in tok(x)["input_ids"] + ([tok.eos_token_id] if eos else [])]


def test_packed_blocks_are_the_stream(tiny_tok: Any, tmp_path: Path) -> None:
    texts = [f"{d} {i}" for i in range(30) for d in DOCS]
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", texts), tmp_path, block_size=16, num_proc=2)
    train, val = build_clm_datasets(cfg, tiny_tok, seed=0, max_positions=64)
    assert val is None
    blocks = ids_of(train)
    assert all(len(b) == 16 for b in blocks)
    stream = _stream(tiny_tok, texts)
    assert len(blocks) == len(stream) // 16  # only the final remainder is dropped
    assert [t for b in blocks for t in b] == stream[: len(blocks) * 16]


def test_packed_txt_eos_once_per_file(tiny_tok: Any, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world\n\nthe lazy dog\n" * 3)
    cfg = cfg_for(tmp_path / "a.txt", tmp_path, block_size=4)
    train, _ = build_clm_datasets(cfg, tiny_tok, seed=0, max_positions=None)
    lines = ["hello world\n", "\n", "the lazy dog\n"] * 3
    expected = _stream(tiny_tok, lines, eos=False) + [tiny_tok.eos_token_id]
    assert [t for b in ids_of(train) for t in b] == expected[: len(expected) // 4 * 4]
    no_eos = cfg_for(tmp_path / "a.txt", tmp_path, block_size=4, add_eos=False)
    train2, _ = build_clm_datasets(no_eos, tiny_tok, seed=0, max_positions=None)
    assert tiny_tok.eos_token_id not in [t for b in ids_of(train2) for t in b]


def test_lines_mode(tiny_tok: Any, tmp_path: Path) -> None:
    long_line = "the quick brown fox jumps over the lazy dog"
    (tmp_path / "a.txt").write_text(f"hello world\n\n   \n{long_line}")
    cfg = cfg_for(tmp_path / "a.txt", tmp_path, mode="lines", block_size=6)
    train, _ = build_clm_datasets(cfg, tiny_tok, seed=0, max_positions=64)
    rows = ids_of(train)
    assert len(rows) == 2  # blank lines skipped
    assert rows[0] == tiny_tok("hello world")["input_ids"] + [tiny_tok.eos_token_id]
    long = tiny_tok(long_line)["input_ids"]
    assert len(long) > 6 and rows[1] == long[:6]  # truncated to block_size


@pytest.mark.shared
def test_shakespeare_gpt2_packed(gpt2_tok: Any, tmp_path: Path) -> None:
    src = tmp_path / "shakespeare.txt"
    with open(shared("text/tinyshakespeare/input.txt"), encoding="utf-8") as fh:
        src.write_text("".join(fh.readlines()[:400]))
    cfg = cfg_for(src, tmp_path, block_size=64, add_eos=False)
    train, _ = build_clm_datasets(cfg, gpt2_tok, seed=0, max_positions=1024)
    lines = src.read_text().splitlines(keepends=True)
    stream = _stream(gpt2_tok, lines, eos=False)
    assert [t for b in ids_of(train) for t in b] == stream[: len(stream) // 64 * 64]


def test_validation_split_deterministic_and_disjoint(tiny_tok: Any, tmp_path: Path) -> None:
    a, b = split_indices(100, 10, seed=3), split_indices(100, 10, seed=3)
    assert all((x == y).all() for x, y in zip(a, b))
    assert len(a[1]) == 10 and set(a[0].tolist()).isdisjoint(a[1].tolist())
    assert sorted(a[0].tolist() + a[1].tolist()) == list(range(100))
    assert a[1].tolist() != split_indices(100, 10, seed=4)[1].tolist()

    texts = [f"doc {i} hello" for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    cfg = cfg_for(path, tmp_path, mode="lines", block_size=32, validation_split_percentage=25)
    train, val = build_clm_datasets(cfg, tiny_tok, seed=7, max_positions=None)
    train2, val2 = build_clm_datasets(cfg, tiny_tok, seed=7, max_positions=None)
    assert val is not None and val2 is not None and len(val) == 10 and len(train) == 30
    assert ids_of(val) == ids_of(val2) and ids_of(train) == ids_of(train2)
    decoded = {tiny_tok.decode(r, skip_special_tokens=True) for r in ids_of(train) + ids_of(val)}
    assert decoded == set(texts)  # disjoint and complete

    # packed: each side is the in-order stream of its own documents, cut into blocks
    pcfg = cfg_for(path, tmp_path, block_size=4, validation_split_percentage=25)
    ptrain, pval = build_clm_datasets(pcfg, tiny_tok, seed=7, max_positions=None)
    assert pval is not None
    for ds, idx in zip((ptrain, pval), split_indices(40, 25, seed=7)):
        stream = _stream(tiny_tok, [texts[i] for i in idx])
        assert [t for b in ids_of(ds) for t in b] == stream[: len(stream) // 4 * 4]


def test_validation_path_and_sample_limits(tiny_tok: Any, tmp_path: Path) -> None:
    train_p = write_jsonl(tmp_path / "t.jsonl", [f"train {i}" for i in range(20)])
    val_p = write_jsonl(tmp_path / "v.jsonl", [f"valid {i}" for i in range(9)])
    cfg = cfg_for(
        train_p,
        tmp_path,
        mode="lines",
        validation_path=str(val_p),
        validation_split_percentage=50,  # ignored: validation_path wins
        max_train_samples=5,
        max_eval_samples=3,
    )
    train, val = build_clm_datasets(cfg, tiny_tok, seed=0, max_positions=None)
    assert val is not None and len(train) == 5 and len(val) == 3
    assert tiny_tok.decode(val[0]["input_ids"], skip_special_tokens=True) == "valid 0"


def test_length_errors(tiny_tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ["hello world"])
    too_long = cfg_for(path, tmp_path, block_size=128)
    with pytest.raises(TunesmithError, match=r"block_size=128 exceeds the model's max .*\(64\)"):
        build_clm_datasets(too_long, tiny_tok, seed=0, max_positions=64)
    too_short = cfg_for(path, tmp_path, block_size=64)
    with pytest.raises(TunesmithError, match=r"has \d+ tokens, fewer than one block of .*size=64"):
        build_clm_datasets(too_short, tiny_tok, seed=0, max_positions=64)


def _cache_state(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in root.rglob("*.arrow")}


def test_cache_reuse_and_invalidation(tiny_tok: Any, gpt2_tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [f"{d} {i}" for i in range(20) for d in DOCS])
    cfg = cfg_for(path, tmp_path, block_size=8)
    first, _ = build_clm_datasets(cfg, tiny_tok, seed=0, max_positions=None)
    before = _cache_state(tmp_path / "cache")
    again, _ = build_clm_datasets(cfg, tiny_tok, seed=0, max_positions=None)
    assert _cache_state(tmp_path / "cache") == before  # nothing re-read, re-tokenized or re-packed
    assert again.cache_files == first.cache_files and ids_of(again) == ids_of(first)

    cfg16 = cfg_for(path, tmp_path, block_size=16)
    bigger, _ = build_clm_datasets(cfg16, tiny_tok, seed=0, max_positions=None)
    assert len(bigger[0]["input_ids"]) == 16 and bigger.cache_files != first.cache_files
    other, _ = build_clm_datasets(cfg, gpt2_tok, seed=0, max_positions=None)
    assert other.cache_files != first.cache_files
    assert ids_of(other)[0] == _stream(gpt2_tok, [f"{DOCS[0]} 0"] + [f"{DOCS[1]} 0"])[:8]
    write_jsonl(path, ["edited file now"] * 10)  # size/mtime change -> records re-read
    edited, _ = build_clm_datasets(cfg, tiny_tok, seed=0, max_positions=None)
    assert ids_of(edited)[0] == _stream(tiny_tok, ["edited file now"] * 2)[:8]


# ------------------------------------------------------------------------------ collate


def test_packed_collator_shifts_labels() -> None:
    batch = PackedCollator()([{"input_ids": [1, 2, 3, 4]}, {"input_ids": [5, 6, 7, 8]}])
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 4)
    assert batch["labels"].tolist() == [[2, 3, 4, -100], [6, 7, 8, -100]]


def test_padded_collator_longest_and_multiple(tiny_tok: Any) -> None:
    pad = tiny_tok.pad_token_id  # == eos: the real EOS target must survive padding
    rows = [{"input_ids": [5, 6, pad]}, {"input_ids": [7]}]
    batch = make_collator(DataConfig(mode="lines"), tiny_tok)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, pad], [7, pad, pad]]
    assert batch["labels"].tolist() == [[6, pad, -100], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    multi = PaddedCollator(pad, pad_to_multiple_of=4)(rows)
    assert multi["input_ids"].shape == (2, 4) and multi["labels"][:, 3].tolist() == [-100, -100]
    assert multi["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    full = PaddedCollator(pad)([{"input_ids": [1, 2]}, {"input_ids": [3, 4]}])
    assert "attention_mask" not in full and full["labels"].tolist() == [[2, -100], [4, -100]]


# ------------------------------------------------------------------------------ loader


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        self.reads += 1
        return {"input_ids": [i, i]}


def _firsts(batches: Any) -> list[list[int]]:
    return [b["input_ids"][:, 0].tolist() for b in batches]


def test_loader_determinism_and_epochs() -> None:
    a = StatefulLoader(_Rows(23), 4, collate_fn=PackedCollator(), seed=5)
    b = StatefulLoader(_Rows(23), 4, collate_fn=PackedCollator(), seed=5)
    ea, eb = _firsts(a), _firsts(b)
    assert ea == eb and len(ea) == len(a) == 5 and all(len(x) == 4 for x in ea)
    assert _firsts(a) != ea  # second pass rolls over to epoch 1: new order
    a.set_epoch(0)
    assert _firsts(a) == ea
    c = StatefulLoader(_Rows(23), 4, collate_fn=PackedCollator(), seed=5, drop_last=False)
    assert len(c) == 6 and sorted(i for x in _firsts(c) for i in x) == list(range(23))


@pytest.mark.parametrize("drop_last", [True, False])
def test_loader_rank_sharding(drop_last: bool) -> None:
    kw: dict[str, Any] = {"collate_fn": PackedCollator(), "seed": 1, "drop_last": drop_last}
    ranks = [StatefulLoader(_Rows(50), 4, rank=r, world_size=3, **kw) for r in range(3)]
    per_rank = [[i for batch in _firsts(lo) for i in batch] for lo in ranks]
    assert len({len(lo) for lo in ranks}) == 1
    if drop_last:  # 50 // 3 = 16 per rank -> 4 full batches, all samples distinct
        assert all(len(s) == 16 for s in per_rank)
        flat = [i for s in per_rank for i in s]
        assert len(set(flat)) == len(flat)
    else:  # 17 per rank (1 repeat by wrap-around), every sample seen
        assert all(len(s) == 17 for s in per_rank)
        assert set().union(*per_rank) == set(range(50))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_exact_resume(num_workers: int) -> None:
    kw: dict[str, Any] = {"collate_fn": PackedCollator(), "seed": 9, "num_workers": num_workers}
    full = StatefulLoader(_Rows(40), 3, **kw)
    full.set_epoch(2)
    expected = _firsts(full)
    first = StatefulLoader(_Rows(40), 3, **kw)
    first.set_epoch(2)
    it = iter(first)
    head = _firsts([next(it) for _ in range(5)])
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batches_done"] == 5 and state["seed"] == 9
    data = _Rows(40)
    resumed = StatefulLoader(data, 3, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # same epoch: keeps the restored position
    tail = _firsts(resumed)
    assert head + tail == expected
    if num_workers == 0:
        assert data.reads == 3 * len(tail)  # skipped batches were never read
    with pytest.raises(TunesmithError, match="checkpoint read 3 samples per step"):
        StatefulLoader(_Rows(40), 4, seed=9).load_state_dict(state)


def test_loader_resumes_across_world_sizes() -> None:
    """4 ranks x batch 2 -> 2 ranks x batch 4 (same 8 samples per step): the global batches of
    the remaining steps are the same sets of samples."""
    def global_batches(world: int, batch: int, state: dict | None) -> list[set[int]]:
        def ids(rows: list[dict]) -> list[int]:
            return [r["input_ids"][0] for r in rows]

        loaders = [StatefulLoader(_Rows(37), batch, collate_fn=ids, seed=5, rank=r, world_size=world)
                   for r in range(world)]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
        per_rank = [list(loader) for loader in loaders]
        return [set().union(*(set(rank[i]) for rank in per_rank)) for i in range(len(per_rank[0]))]

    full = global_batches(4, 2, None)
    state = StatefulLoader(_Rows(37), 2, seed=5, rank=0, world_size=4).state_dict()
    state["batches_done"] = 2
    assert global_batches(2, 4, state) == full[2:]
    assert global_batches(1, 8, state) == full[2:]
    with pytest.raises(TunesmithError, match="samples per step"):
        StatefulLoader(_Rows(37), 2, seed=5, world_size=2).load_state_dict(state)


def test_loader_too_small() -> None:
    with pytest.raises(TunesmithError, match="fewer than one batch"):
        StatefulLoader(_Rows(5), 4, world_size=2)


def test_in_order_keeps_the_shard_in_dataset_order_with_equal_rank_counts():
    """`StatefulLoader.in_order` (dpo.precompute_reference's pass): the same batch size, collation
    and rank shard, no shuffling and no dropped tail; 7 items on 2 ranks give 4 each (one wraps)."""
    data = list(range(7))
    shuffled = [StatefulLoader(data, 2, collate_fn=list, seed=3, shuffle=True, drop_last=True,
                               rank=r, world_size=2) for r in (0, 1)]
    ordered = [loader.in_order() for loader in shuffled]
    assert [[x for b in loader for x in b] for loader in ordered] == [[0, 2, 4, 6], [1, 3, 5, 0]]
    assert [len(loader) for loader in ordered] == [2, 2]
