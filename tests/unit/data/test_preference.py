"""Preference data (task=dpo): record formats, SFT-identical rendering, the pair collator,
length policy and counts, bad records, sharding and resume, `tunesmith data inspect`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import shared_path
from tunesmith.cli.main import run
from tunesmith.config import load_config
from tunesmith.config.schema import DataConfig
from tunesmith.config.tasks import SFTConfig
from tunesmith.data import load_tokenizer
from tunesmith.data.assembly import Shard, build_task_data
from tunesmith.data.preference import PairCollator, build_preference_datasets
from tunesmith.data.sft import InvalidRecord
from tunesmith.data.sft_data import SFTCollator, build_sft_datasets
from tunesmith.errors import TunesmithError

# A Jinja chat template without special tokens, so it works with the GPT-2 tokenizer.
PLAIN_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<assistant>: {% endif %}")
STANDARD = [
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Lyon, I think."},
    {"prompt": "Name a prime number:", "chosen": " Seven.", "rejected": " Nine."},
    {"prompt": "2+2=", "chosen": "4", "rejected": "22"},
]
CONV = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"}]


def _conv(answer: str) -> list[dict[str, str]]:
    return [*CONV, {"role": "assistant", "content": answer}]


@pytest.fixture()
def templated_gpt2() -> Any:
    """Its own GPT-2 tokenizer with a Jinja chat template (the shared fixtures stay plain)."""
    tok = load_tokenizer(str(shared_path("tokenizers", "gpt2", "hf")))
    tok.chat_template = PLAIN_TEMPLATE
    return tok


def _write(tmp_path: Path, records: list, name: str = "pairs.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records) if name.endswith(".jsonl")
                 else json.dumps(records))
    return p


def _pairs(path: Path, tok: Any, block: int = 256, **sft: Any):
    data = DataConfig(path=str(path), block_size=block, validation_split_percentage=0)
    return build_preference_datasets(data, SFTConfig(**sft), tok, seed=0)


def _sft(path: Path, tok: Any, block: int = 256, **sft: Any) -> list[dict]:
    data = DataConfig(path=str(path), block_size=block, validation_split_percentage=0)
    return build_sft_datasets(data, SFTConfig(**sft), tok, seed=0).train.items


def _targets(tok: Any, ex: dict) -> str:
    return tok.decode([i for i, m in zip(ex["input_ids"], ex["loss_mask"]) if m])


def test_standard_records_without_template_are_sft_custom(gpt2_tok: Any, tmp_path: Path) -> None:
    out = _pairs(_write(tmp_path, STANDARD), gpt2_tok)
    assert out.stats.pairs == len(out.train) == 3 and out.stats.records == 3
    sft = _sft(_write(tmp_path, [{"prompt": r["prompt"], "response": r[side]}
                                 for r in STANDARD for side in ("chosen", "rejected")], "s.jsonl"),
               gpt2_tok, format="custom", prompt_template="{prompt}", response_template="{response}")
    for i, rec in enumerate(STANDARD):
        pair = out.train[i]
        assert pair["chosen"] == sft[2 * i] and pair["rejected"] == sft[2 * i + 1]
        for side in ("chosen", "rejected"):
            assert _targets(gpt2_tok, pair[side]) == rec[side] + "<|endoftext|>"
        # Both sides share the prompt tokens, none of which is a target.
        n = pair["chosen"]["loss_mask"].index(True)
        assert pair["chosen"]["input_ids"][:n] == pair["rejected"]["input_ids"][:n]
        assert gpt2_tok.decode(pair["chosen"]["input_ids"][:n]) == rec["prompt"]
    s = out.stats
    assert s.tokens == sum(len(p[k]["input_ids"]) for p in out.train for k in p)
    assert s.target_tokens == sum(sum(p[k]["loss_mask"][1:]) for p in out.train for k in p)


@pytest.mark.parametrize("template", ["llama3", "alpaca"])
def test_standard_records_through_builtin_template_match_sft(llama3_tok: Any, tmp_path: Path,
                                                             template: str) -> None:
    path = _write(tmp_path, STANDARD)
    out = _pairs(path, llama3_tok, chat_template=template, system_prompt="Be brief.")
    chats = [{"messages": [{"role": "user", "content": r["prompt"]},
                           {"role": "assistant", "content": r[side]}]}
             for r in STANDARD for side in ("chosen", "rejected")]
    sft = _sft(_write(tmp_path, chats, "chat.jsonl"), llama3_tok, format="chat",
               chat_template=template, system_prompt="Be brief.")
    for i, rec in enumerate(STANDARD):
        assert out.train[i]["chosen"] == sft[2 * i] and out.train[i]["rejected"] == sft[2 * i + 1]
    assert _targets(llama3_tok, out.train[0]["chosen"]) == (
        "Paris.<|eot_id|>" if template == "llama3" else " Paris.<|end_of_text|>")
    assert "Be brief." in llama3_tok.decode(out.train[0]["rejected"]["input_ids"])


def test_conversational_records_match_sft_and_train_only_the_last_turn(
        templated_gpt2: Any, tmp_path: Path) -> None:
    tok = templated_gpt2
    whole = {"chosen": _conv("4"), "rejected": _conv("5")}  # implicit prompt: the shared prefix
    split = {"prompt": CONV, "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "5"}]}
    mixed = {"prompt": CONV, "chosen": "4", "rejected": "5"}  # strings: assistant messages
    out = _pairs(_write(tmp_path, [whole, split, mixed]), tok)  # chat_template: 'tokenizer'
    assert out.train[0] == out.train[1] == out.train[2]
    sft = _sft(_write(tmp_path, [{"messages": _conv("4")}], "c.jsonl"), tok, format="chat")[0]
    chosen = out.train[0]["chosen"]
    assert chosen["input_ids"] == sft["input_ids"]  # exactly SFT's tokens
    assert _targets(tok, sft) == " Hello.\n 4\n"  # SFT trains every assistant turn,
    assert _targets(tok, chosen) == " 4\n"  # preference pairs only the answer
    assert _targets(tok, out.train[0]["rejected"]) == " 5\n"


def test_pair_collator_interleaves_sft_rows(gpt2_tok: Any, tmp_path: Path) -> None:
    pairs = _pairs(_write(tmp_path, STANDARD), gpt2_tok).train.items
    batch = PairCollator(gpt2_tok.eos_token_id)(pairs)
    rows = [p[side] for p in pairs for side in ("chosen", "rejected")]
    ref = SFTCollator(gpt2_tok.eos_token_id)(rows)
    assert batch.keys() == ref.keys() == {"input_ids", "labels", "attention_mask"}
    for k in ref:
        assert torch.equal(batch[k], ref[k])
    assert batch["input_ids"].shape == (6, max(len(r["input_ids"]) for r in rows))
    for i, pair in enumerate(pairs):
        for row, side in ((2 * i, "chosen"), (2 * i + 1, "rejected")):
            ex = pair[side]
            n = len(ex["input_ids"])
            assert batch["input_ids"][row, :n].tolist() == ex["input_ids"]
            pad = batch["input_ids"].shape[1] - n
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * pad
            labels = batch["labels"][row]
            # Shifted: labels[t] is token t + 1 when that token is a target, else -100.
            want = [ex["input_ids"][t + 1] if ex["loss_mask"][t + 1] else -100
                    for t in range(n - 1)]
            assert labels[: n - 1].tolist() == want
            assert bool((labels[n - 1:] == -100).all())
            assert gpt2_tok.decode(labels[labels != -100].tolist()) == (
                STANDARD[i][side] + "<|endoftext|>")


def test_length_policy_and_identical_pairs_are_counted(gpt2_tok: Any, tmp_path: Path,
                                                       caplog: Any) -> None:
    long = "word " * 40  # ~40 tokens
    recs = [
        {"prompt": "Q:", "chosen": " yes", "rejected": " no"},  # kept
        {"prompt": "Q:", "chosen": " same", "rejected": " same"},  # identical
        {"prompt": "Q:", "chosen": " short", "rejected": long},  # rejected overlong
        {"prompt": long, "chosen": " a", "rejected": " b"},  # prompt fills the block
        {"prompt": "Q:", "chosen": long + "A", "rejected": long + "B"},  # same once cut
    ]
    path = _write(tmp_path, recs)
    cut = _pairs(path, gpt2_tok, block=24)
    s = cut.stats
    assert (s.records, s.pairs, s.truncated, s.dropped_no_target, s.dropped_identical) == (
        5, 2, 3, 1, 2)
    assert [len(p["rejected"]["input_ids"]) for p in cut.train] == [4, 24]  # Q : no EOS; cut
    assert "dropped 2 pairs whose chosen and rejected sides are the same tokens" in caplog.text
    dropped = _pairs(path, gpt2_tok, block=24, overlong="drop")
    assert (dropped.stats.pairs, dropped.stats.dropped_overlong,
            dropped.stats.dropped_identical) == (1, 3, 1)
    with pytest.raises(TunesmithError, match=r"record 3 \(line 3\) \(rejected\): example has "
                       r"\d+ tokens, more than data.block_size=24"):
        _pairs(path, gpt2_tok, block=24, overlong="error")
    with pytest.raises(TunesmithError, match="never trains on prompts"):
        _pairs(path, gpt2_tok, train_on_inputs=True)


@pytest.mark.parametrize("record, pattern", [
    ({"prompt": "q", "chosen": "a"}, r"record 2 \(line 2\): missing field 'rejected'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, r"field 'chosen' holds int, expected a string"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, r"empty response in field 'rejected'"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, r"null field 'prompt'"),
    (["q", "a", "b"], r"record 2 \(line 2\): expected a JSON object, got list"),
    ({"chosen": _conv("4"), "rejected": [{"role": "user", "content": "x"},
                                         {"role": "assistant", "content": "5"}]},
     r"'chosen' and 'rejected' must be the same conversation up to their last"),
    ({"chosen": _conv("4"), "rejected": [*CONV, {"role": "user", "content": "?"}]},
     r"field 'rejected' must end with an assistant message"),
    ({"chosen": _conv("4"), "rejected": _conv(" ")}, r"empty response in field 'rejected'"),
    ({"prompt": CONV, "chosen": [{"role": "robot", "content": "4"}], "rejected": "5"},
     r"chosen\[0\]: unknown role 'robot'"),
])
def test_bad_records_name_file_record_and_field(templated_gpt2: Any, tmp_path: Path,
                                                record: Any, pattern: str) -> None:
    path = _write(tmp_path, [STANDARD[0], record])
    with pytest.raises(InvalidRecord, match=pattern) as info:
        _pairs(path, templated_gpt2)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    out = _pairs(path, templated_gpt2, invalid="skip")
    assert out.stats.invalid_skipped == 1 and out.stats.pairs == 1


def test_field_renames(gpt2_tok: Any, tmp_path: Path) -> None:
    recs = [{"question": "Q:", "good": " yes", "bad": " no"}]
    out = _pairs(_write(tmp_path, recs), gpt2_tok,
                 fields={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert _targets(gpt2_tok, out.train[0]["rejected"]) == " no<|endoftext|>"
    with pytest.raises(InvalidRecord, match="missing field 'good'"):
        _pairs(_write(tmp_path, STANDARD, "s.json"), gpt2_tok, fields={"chosen": "good"})


# ------------------------------------------------------------------------------ assembly, CLI
def _argv(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    tok = shared_path("tokenizers", "gpt2", "hf")
    return ["model.name=tiny", f"model.tokenizer={tok}",
            ("model.overrides={vocab_size: 50257, dim: 32, n_layers: 1, n_heads: 2, "
             "n_kv_heads: 1, intermediate_size: 64, max_position_embeddings: 128}"),
            f"data.path={data}", "task=dpo", "data.block_size=64", "train.micro_batch_size=2",
            "data.validation_split_percentage=0", f"output.dir={tmp_path / 'out'}", *extra]


def _task(tmp_path: Path, data: Path, shard: Shard, *extra: str) -> Any:
    from tunesmith.build.spec import resolve_spec

    cfg = load_config(None, _argv(tmp_path, data, *extra))
    spec = resolve_spec(cfg)
    return build_task_data(cfg, spec.family, spec.tokenizer, spec.max_positions,
                           spec.tokenizer_source, shard)


def _prompts(batch: dict, tok: Any) -> list[str]:
    """The prompt of each chosen row (even rows), which names its pair."""
    return [tok.decode(ids[: int(mask.sum())]).split(":")[0]
            for ids, mask in zip(batch["input_ids"][0::2], batch["attention_mask"][0::2])]


def test_two_ranks_cover_every_pair_once_and_resume(gpt2_tok: Any, tmp_path: Path) -> None:
    recs = [{"prompt": f"Pair {i}:", "chosen": " good" * (1 + i % 3), "rejected": " bad"}
            for i in range(20)]
    path = _write(tmp_path, recs)
    seen: list[str] = []
    for rank in (0, 1):
        task = _task(tmp_path, path, Shard(rank, 2))
        assert task.sized and task.val_loader is None and task.stats["train"]["pairs"] == 20
        batches = list(task.train_loader)
        assert len(batches) == 5 and all(b["input_ids"].shape[0] == 4 for b in batches)
        seen += [p for b in batches for p in _prompts(b, gpt2_tok)]
    assert sorted(seen) == sorted(f"Pair {i}" for i in range(20))
    # Resume mid-epoch: a fresh loader given the state yields exactly the remaining batches.
    loader = _task(tmp_path, path, Shard(0, 1)).train_loader
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    rest = [_prompts(b, gpt2_tok) for b in it]
    again = _task(tmp_path, path, Shard(0, 1)).train_loader
    again.load_state_dict(state)
    assert [_prompts(b, gpt2_tok) for b in again] == rest and len(rest) == 7


def test_validation_split_and_stats(tmp_path: Path) -> None:
    recs = [{"prompt": f"P{i}:", "chosen": " a", "rejected": " b"} for i in range(20)]
    task = _task(tmp_path, _write(tmp_path, recs), Shard(0, 1),
                 "data.validation_split_percentage=20")
    assert task.stats["train"]["pairs"] == 16 and task.stats["validation"]["pairs"] == 4
    assert sum(b["input_ids"].shape[0] for b in task.val_loader) == 8  # 4 pairs, 2 rows each


def test_data_inspect_shows_pairs_and_counts(gpt2_tok: Any, tmp_path: Path, capsys: Any) -> None:
    path = _write(tmp_path, [*STANDARD, {"prompt": "x", "chosen": " s", "rejected": " s"}])
    assert run(["data", "inspect", *_argv(tmp_path, path), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "pair 0 chosen" in out and "pair 0 rejected" in out and "pair 1" not in out
    assert "pairs: 3; one epoch yields 2 pairs (4 rows: chosen, rejected)" in out
    assert "identical sides 1" in out
    assert not (tmp_path / "out").exists()


def test_data_inspect_bad_record_exits_2_with_one_line(tmp_path: Path, capsys: Any) -> None:
    path = _write(tmp_path, [STANDARD[0], {"prompt": "q", "chosen": "a"}])
    assert run(["data", "inspect", *_argv(tmp_path, path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: record 2 (line 2): missing field 'rejected' (sft.invalid=skip skips " \
        "such records and counts them)" in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(errors) == 1 and "rejected" in errors[0]


def test_sample_file_through_llama3_template(tmp_path: Path, capsys: Any) -> None:
    """recipes/data/preference_sample.jsonl (hand-written standard records) as a chat."""
    sample = Path(__file__).resolve().parents[3] / "recipes" / "data" / "preference_sample.jsonl"
    tok = shared_path("tokenizers", "llama3", "hf")
    argv = [*_argv(tmp_path, sample), f"model.tokenizer={tok}", "sft.chat_template=llama3",
            ("model.overrides={vocab_size: 128256, dim: 32, n_layers: 1, n_heads: 2, "
             "n_kv_heads: 1, intermediate_size: 64, max_position_embeddings: 128}")]
    assert run(["data", "inspect", *argv, "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "pairs: 16;" in out and "dropped pairs: overlong 0, no target left 0" in out
    assert out.count("<|start_header_id|>assistant<|end_header_id|>") == 2


def test_compiled_runs_pad_to_a_multiple_of_64() -> None:
    """Under train.compile unpacked SFT and DPO batches are padded to a multiple of 64 (few
    distinct lengths for the compiled blocks); the real tokens' labels are unchanged."""
    from tunesmith.data.assembly import COMPILE_PAD_MULTIPLE, pad_multiple

    base = ["data.path=x", "task=dpo"]
    assert pad_multiple(load_config(None, base)) is None
    assert pad_multiple(load_config(None, [*base, "train.compile=true"])) == COMPILE_PAD_MULTIPLE == 64
    assert pad_multiple(load_config(None, [*base, "train.compile=true", "data.pad_to_multiple_of=8"])) == 8
    # tensor parallel: a multiple of tp too (sequence parallelism needs equal slices)
    assert pad_multiple(load_config(None, [*base, "parallel.tp=3"])) == 3
    assert pad_multiple(load_config(None, [*base, "parallel.tp=4", "data.pad_to_multiple_of=6"])) == 12
    assert pad_multiple(load_config(None, [*base, "parallel.tp=2", "train.compile=true"])) == 64
    pair = {"chosen": {"input_ids": [5, 6, 7, 8], "loss_mask": [False, False, True, True]},
            "rejected": {"input_ids": [5, 6, 9], "loss_mask": [False, False, True]}}
    tight, padded = PairCollator(0)([pair]), PairCollator(0, 64)([pair])
    assert tight["input_ids"].shape == (2, 4) and padded["input_ids"].shape == (2, 64)
    assert torch.equal(padded["labels"][:, :4], tight["labels"]) and (padded["labels"][:, 4:] == -100).all()
