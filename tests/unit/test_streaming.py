"""Streaming loader: exact resume from a JSON-serialised state, rank sharding, shuffling; and
ROUGE on a known pair."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tunesmith.data.records import RecordReader
from tunesmith.data.sft_data import SFTCollator
from tunesmith.data.streaming import StreamingLoader
from tunesmith.eval.rouge import corpus_scores, rouge_l, rouge_n


def _write_jsonl(path: Path, n: int) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"text": f"doc {i} " + "x" * (i % 7)}) + "\n")
    return path


def _encode_tokens(record: Any, where: str) -> list[int]:
    """A stand-in tokenizer: the record number, then one token per character."""
    n = int(record["text"].split()[1])
    return [1000 + n] + [ord(c) for c in record["text"]]


def _encode_example(record: Any, where: str) -> dict | None:
    ids = _encode_tokens(record, where)
    if int(record["text"].split()[1]) % 5 == 0:
        return None  # skipped records must not disturb resume
    return {"input_ids": ids, "loss_mask": [False] + [True] * (len(ids) - 1)}


def _loader(path: Path, mode: str, rank: int = 0, world: int = 1, buffer: int = 8
            ) -> StreamingLoader:
    collate = SFTCollator(0) if mode != "blocks" else (
        lambda rows: torch.tensor([r["input_ids"] for r in rows]))
    encode = _encode_tokens if mode == "blocks" else _encode_example
    return StreamingLoader(RecordReader(str(path)), encode, mode=mode, batch_size=3,
                           collate_fn=collate, block_size=16, seed=7, shuffle_buffer=buffer,
                           rank=rank, world_size=world)


def _run(loader: StreamingLoader, epochs: int) -> list[Any]:
    out = []
    for e in range(epochs):
        loader.set_epoch(e)
        out += [b if isinstance(b, torch.Tensor) else b["input_ids"] for b in loader]
    return out


@pytest.mark.parametrize("mode", ["blocks", "examples", "packed"])
def test_stream_resume_is_exact(tmp_path: Path, mode: str) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", 40)
    reference = _run(_loader(path, mode), epochs=2)
    assert len(reference) > 6
    for stop in (1, 4, len(reference) // 2 + 1):  # mid-epoch and in the second epoch
        first = _loader(path, mode)
        got, epoch = [], 0
        while len(got) < stop:
            first.set_epoch(epoch)
            for batch in first:
                got.append(batch if isinstance(batch, torch.Tensor) else batch["input_ids"])
                if len(got) == stop:
                    break
            else:
                epoch += 1
        state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint
        resumed = _loader(path, mode)
        resumed.load_state_dict(state)
        e = resumed.epoch
        while len(got) < len(reference):
            resumed.set_epoch(e)
            got += [b if isinstance(b, torch.Tensor) else b["input_ids"] for b in resumed]
            e += 1
        assert len(got) == len(reference)
        for a, b in zip(got, reference):
            assert torch.equal(a, b)


def test_stream_shards_ranks_and_shuffles(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", 30)
    seen = []
    for rank in range(2):
        batches = _run(_loader(path, "examples", rank=rank, world=2), epochs=1)
        seen.append({int(b[i, 0]) for b in batches for i in range(b.shape[0])})
    assert not seen[0] & seen[1]  # disjoint records per rank
    assert all(n % 2 == 0 for n in (x - 1000 for x in seen[0]))
    epochs = _run(_loader(path, "examples", buffer=30), epochs=2)
    order = [int(b[i, 0]) for b in epochs for i in range(b.shape[0])]
    half = len(order) // 2
    assert order[:half] != sorted(order[:half]) and order[:half] != order[half:]
    plain = _run(_loader(path, "examples", buffer=0), epochs=1)
    assert [int(b[i, 0]) for b in plain for i in range(b.shape[0])] == sorted(
        1000 + n for n in range(30) if n % 5)[: len(plain) * 3]


def test_hub_streaming_path_uses_skip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A hub name goes through datasets' streaming mode; resume skips what was taken."""
    import datasets

    path = _write_jsonl(tmp_path / "d.jsonl", 12)
    real = datasets.load_dataset

    def fake(name, config=None, split="train", streaming=False):
        assert name == "org/data" and streaming
        return real("json", data_files=str(path), split=split, streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    reader = RecordReader("org/data", streaming_hub=True)
    items = list(reader.iter_from())
    assert [r["text"] for _, _, r in items][:2] == ["doc 0 ", "doc 1 x"]
    rest = list(reader.iter_from(items[4][0]))
    assert [r for _, _, r in rest] == [r for _, _, r in items[5:]]


def test_rouge_known_pair() -> None:
    """The example of Google's rouge-score README (values from that package)."""
    target = "The quick brown fox jumps over the lazy dog"
    pred = "The quick brown dog jumps on the log."
    r1, r2, rl = rouge_n(pred, target, 1), rouge_n(pred, target, 2), rouge_l(pred, target)
    assert (r1["precision"], r1["recall"]) == pytest.approx((0.75, 0.6666667))
    assert r1["f1"] == pytest.approx(0.7058824)
    assert (r2["precision"], r2["recall"], r2["f1"]) == pytest.approx((2 / 7, 0.25, 0.2666667))
    assert (rl["precision"], rl["recall"], rl["f1"]) == pytest.approx((0.625, 0.5555556,
                                                                        0.5882353))
    scores = corpus_scores([pred, "The cat."], [target, "the cat"])
    assert scores["exact_match"] == 0.5 and scores["rouge1"] == pytest.approx((0.7058824 + 1) / 2)
    assert rouge_n("", "abc", 1)["f1"] == 0.0
