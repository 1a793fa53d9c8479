"""`tunesmith data inspect`: the loader's first rows with their loss mask, packing and counts."""

from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_overrides
from tunesmith.cli.data_inspect import first_rows, render_row, training_loader
from tunesmith.cli.main import run
from tunesmith.config import load_config

RECORDS = [{"instruction": f"Repeat the number {i}.", "input": "", "output": f"{i} {i} {i}"}
           for i in range(40)]


@pytest.fixture()
def alpaca(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def _sft(tok, tmp_path, data, *extra):
    return [*tiny_overrides(tok, tmp_path / "out", data), "task=sft", "sft.format=alpaca",
            "data.validation_split_percentage=0", "data.block_size=256", *extra]


def test_packed_sft_rows_show_targets_and_documents(tiny_tokenizer_dir, alpaca, tmp_path, capsys):
    argv = _sft(tiny_tokenizer_dir, tmp_path, alpaca, "sft.packing=true")
    assert run(["data", "inspect", *argv, "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("\nrow ") == 2
    assert "⟦doc 0 · pos 0-" in out and "⟦doc 1 · pos 0-" in out  # positions restart per document
    assert "examples: 40;" in out and "carry a loss" in out and "truncated: 0" in out
    assert not (tmp_path / "out").exists()  # inspecting writes nothing

    cfg = load_config(None, argv)
    loader, tok, _, shift = training_loader(cfg)
    row = first_rows(loader, 1)[0]
    text = render_row(row, tok, shift)
    trained = "".join(text.plain[s.start:s.end] for s in text.spans if s.style == "bold green")
    # Every trained span is a response ("i i i") plus EOS; nothing of the prompt is trained.
    assert "Repeat" not in trained and "Response" not in trained
    assert trained.count("<|endoftext|>") == sum(1 for s in text.spans if s.style == "bold magenta")
    record = json.loads(alpaca.read_text().splitlines()[0])
    assert record["output"] in "".join(text.plain.split("⟦"))  # the text reads as written


def test_plain_text_counts(tiny_tokenizer_dir, demo_text, tmp_path, capsys):
    argv = tiny_overrides(tiny_tokenizer_dir, tmp_path / "out", demo_text[1])
    assert run(["data", "inspect", *argv, "data.block_size=32", "--n", "1"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("tokens:"))
    tokens = int(line.split()[1].replace(",", ""))
    rows = int(next(ln for ln in out.splitlines() if ln.startswith("examples:")).split()[5])
    assert tokens == rows * 32  # packed blocks: every token is real
    assert "(96.9% of tokens carry a loss)" in out  # 31 of 32: the last has no next token


def test_inspect_bad_input(tmp_path, tiny_tokenizer_dir, capsys):
    missing = tmp_path / "nope.jsonl"
    code = run(["data", "inspect", *tiny_overrides(tiny_tokenizer_dir, tmp_path / "o", missing)])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "Traceback" not in err
