"""Tasks through the CLI: SFT with packing and evaluation by generation, GPT-2 CLM streaming,
RoBERTa MLM, `eval --generate`, and bad input -> one line, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import shared_path
from tunesmith.cli.main import run

TINY_LLAMA = ("model.overrides={vocab_size: 512, dim: 64, n_layers: 2, n_heads: 4, "
              "n_kv_heads: 2, intermediate_size: 128, max_position_embeddings: 512}")
COMMON = ["train.precision=fp32", "logging.progress=false", "train.micro_batch_size=4",
          "schedule.warmup_steps=0", "optim.lr=3e-3"]


def _recipe(tmp_path: Path) -> str:
    p = tmp_path / "empty.yaml"
    p.write_text("{}\n")
    return str(p)


WORDS = ["apple", "river", "stone", "cloud", "flame"]


def _qa_records(n: int) -> list[dict]:
    return [{"instruction": f"Name thing {i % 5}.", "input": "",
             "output": f"The answer is {WORDS[i % 5]}."} for i in range(n)]


def _write(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_sft_packed_run_with_generation_eval(tmp_path, tiny_tokenizer_dir, capsys) -> None:
    data = _write(tmp_path / "qa.jsonl", _qa_records(60))
    out = tmp_path / "run"
    argv = ["train", _recipe(tmp_path), "task=sft", "model.name=tiny",
            f"model.tokenizer={tiny_tokenizer_dir}", TINY_LLAMA, f"data.path={data}",
            "data.block_size=256", "data.validation_split_percentage=10", "sft.packing=true",
            "train.max_steps=30", f"output.dir={out}", "eval.generate.enabled=true",
            "eval.generate.max_new_tokens=8", *COMMON]
    assert run(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["train"]["examples"] == 54
    assert summary["data"]["train"]["packed_rows"] < 54
    assert summary["eval_loss"] < 3.0  # from ln(512) = 6.2 at init (measured: 2.4)
    # After 30 tiny steps the shared answer frame is learned (measured: rouge1 ~0.67).
    assert summary["gen_samples"] == 6 and summary["gen_rouge1"] > 0.5
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"prompt", "reference", "prediction", "rougeL"} <= set(rows[0])
    capsys.readouterr()
    # The saved model answers the same file through `tunesmith eval --generate`.
    assert run(["eval", str(out / "final"), "--data", str(data), "--generate",
                "--max-samples", "3", "--max-new-tokens", "8", "--device", "cpu",
                "--output", str(tmp_path / "p.jsonl")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["samples"] == 3 and 0 <= res["rougeL"] <= 1 and (tmp_path / "p.jsonl").exists()


def test_gpt2_streaming_clm_on_wikitext(tmp_path, capsys) -> None:
    tok = shared_path("tokenizers", "gpt2", "hf")
    wiki = shared_path("text", "wikitext-2", "wiki.valid.raw")
    out = tmp_path / "run"
    argv = ["train", _recipe(tmp_path), "model.name=gpt2-tiny", f"model.tokenizer={tok}",
            "model.overrides={n_embd: 32, n_head: 2, n_layer: 1}", f"data.path={wiki}",
            "data.streaming=true", "data.shuffle_buffer=64", "data.block_size=64",
            "train.max_steps=4", f"output.dir={out}", "output.save_final=false", *COMMON]
    assert run(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens_seen"] == 4 * 4 * 64


def test_roberta_mlm_run_reports_perplexity(tmp_path, tiny_tokenizer_dir, demo_text,
                                            capsys) -> None:
    from tunesmith.data import load_tokenizer

    tok = load_tokenizer(str(tiny_tokenizer_dir))
    tok.add_special_tokens({"mask_token": "<mask>"})
    tok.save_pretrained(tmp_path / "tok")
    out = tmp_path / "run"
    argv = ["train", _recipe(tmp_path), "task=mlm", "model.name=roberta-tiny",
            f"model.tokenizer={tmp_path / 'tok'}",
            f"model.overrides={{vocab_size: 520, pad_token_id: {tok.pad_token_id}}}",
            f"data.path={demo_text[0]}", f"data.validation_path={demo_text[1]}",
            "data.block_size=64", "train.max_steps=6", "eval.max_batches=2",
            f"output.dir={out}", *COMMON]
    assert run(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss"] > 0 and summary["perplexity"] > 1
    assert (out / "final" / "config.json").exists()
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["architectures"] == ["RobertaForMaskedLM"]
    # `tunesmith eval` on an encoder reports the masked-LM loss (fixed, content-seeded masks).
    capsys.readouterr()
    argv = ["eval", str(out / "final"), "--data", str(demo_text[1]), "--block-size", "64",
            "--device", "cpu", "--max-batches", "2"]
    assert run(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert run(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["eval_loss"] == again["eval_loss"] > 0 and first["eval_tokens"] > 0


@pytest.mark.parametrize("extra, records, pattern", [
    (["sft.format=alpaca"], [{"instruction": "x", "output": "y"}, {"instruction": "z"}],
     r"record 2 \(line 2\): missing field 'output'"),
    (["sft.format=dolly", "sft.category=closed_qa"],
     [{"instruction": "x", "context": "", "response": "y", "category": "open_qa"}],
     r"sft.category=\['closed_qa'\] matched none of the 1 records"),
    (["sft.format=chat"], [{"messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "yo"}]}],
     r"has no chat template; set sft.chat_template"),
    (["task=mlm"], [{"instruction": "x", "output": "y"}], r"task=mlm needs an encoder"),
    (["data.streaming=true"], [{"instruction": "x", "output": "y"}],
     r"data.streaming needs train.max_steps"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, tiny_tokenizer_dir, capsys, extra, records,
                                      pattern) -> None:
    data = _write(tmp_path / "d.jsonl", records)
    argv = ["train", _recipe(tmp_path), "task=sft", "model.name=tiny",
            f"model.tokenizer={tiny_tokenizer_dir}", TINY_LLAMA, f"data.path={data}",
            "data.validation_split_percentage=0", f"output.dir={tmp_path / 'o'}", *COMMON,
            *extra]
    if "data.streaming=true" not in extra:
        argv.append("train.max_steps=1")
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunesmith: error:") and "\n" not in err
    import re

    assert re.search(pattern, err), err
    assert not (tmp_path / "o").exists()  # nothing written for a run that cannot start


def test_streamed_sft_invalid_record_says_how_to_skip(tmp_path, tiny_tokenizer_dir, capsys) -> None:
    """A streamed record is met only once training runs, so the run has started (its output
    directory exists), but the one line still says what, where and how to go on."""
    data = _write(tmp_path / "d.jsonl", [{"instruction": "x", "output": " "}])
    argv = ["train", _recipe(tmp_path), "task=sft", "model.name=tiny", "sft.format=alpaca",
            f"model.tokenizer={tiny_tokenizer_dir}", TINY_LLAMA, f"data.path={data}",
            "data.validation_split_percentage=0", f"output.dir={tmp_path / 'o'}", *COMMON,
            "data.streaming=true", "train.max_steps=1"]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"tunesmith: error: {data}: record 1 (line 1): empty response in field "
                   "'output' (sft.invalid=skip skips such records and counts them)")
