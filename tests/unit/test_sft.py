"""SFT data: formats, response-only labels (also through chat templates), policies, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import shared_path
from tunesmith.config.schema import DataConfig
from tunesmith.config.tasks import SFTConfig
from tunesmith.data.sft import InvalidRecord, SFTFormatter
from tunesmith.data.sft_data import SFTCollator, build_sft_datasets
from tunesmith.errors import TunesmithError

ALPACA = ("instruct", "alpaca", "alpaca_data_first335.json")

# Synthetic records in the exact schemas of databricks-dolly-15k and SAMSum (not in shared/).
DOLLY = [
    {"instruction": "Who wrote Hamlet?", "context": "", "response": "William Shakespeare.",
     "category": "open_qa"},
    {"instruction": "Summarize the text.", "context": "Cats sleep a lot. They purr.",
     "response": "Cats sleep and purr.", "category": "summarization"},
    {"instruction": "What is the boiling point of water?", "context": "",
     "response": "100 degrees Celsius at sea level.", "category": "open_qa"},
    {"instruction": "Name a prime number.", "context": "", "response": "Seven.",
     "category": "brainstorming"},
]
SAMSUM = [
    {"id": "13818513", "dialogue": "Amanda: I baked cookies. Do you want some?\r\nJerry: Sure!"
     "\r\nAmanda: I'll bring you tomorrow :-)", "summary": "Amanda baked cookies and will bring "
     "Jerry some tomorrow."},
    {"id": "13728867", "dialogue": "Olivia: Who are you voting for?\r\nOliver: Liberals as "
     "always.", "summary": "Olivia and Oliver are voting for liberals."},
]
CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi!"},
                  {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
]
SHAREGPT = [{"conversations": [
    {"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello."},
    {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}]
# A Jinja chat template without special tokens, so it works with the GPT-2 tokenizer.
PLAIN_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<assistant>: {% endif %}")


def _write(tmp_path: Path, records: list, name: str = "data.jsonl") -> Path:
    p = tmp_path / name
    if name.endswith(".jsonl"):
        p.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        p.write_text(json.dumps(records))
    return p


def _build(path: Path, tok: Any, block: int = 256, pct: float = 0, **sft: Any):
    data = DataConfig(path=str(path), block_size=block, validation_split_percentage=pct)
    return build_sft_datasets(data, SFTConfig(**sft), tok, seed=0)


def _targets(tok: Any, ex: dict) -> str:
    """Text of the tokens that carry a label after the collator's shift."""
    batch = SFTCollator(0)([ex])
    labels = batch["labels"][0]
    return tok.decode(labels[labels != -100].tolist())


def test_alpaca_real_file_labels_only_response(llama3_tok: Any) -> None:
    path = shared_path(*ALPACA)
    # the error says where, and how to go on (sft.invalid=skip)
    with pytest.raises(TunesmithError, match=r"record 285: empty response in field 'output' "
                       r"\(sft.invalid=skip skips such records and counts them\)"):
        _build(path, llama3_tok)
    out = _build(path, llama3_tok, invalid="skip")
    assert out.stats.invalid_skipped == 1 and out.stats.examples == 334
    first = json.loads(path.read_text())[0]
    ex = out.train[0]
    assert ex["input_ids"][0] == llama3_tok.bos_token_id
    assert _targets(llama3_tok, ex) == first["output"] + "<|end_of_text|>"
    full = llama3_tok.decode(ex["input_ids"])
    assert "### Instruction:\nGive three tips for staying healthy." in full
    # train_on_inputs: every token after the first is a target.
    all_ex = _build(path, llama3_tok, invalid="skip", train_on_inputs=True).train[0]
    assert int((SFTCollator(0)([all_ex])["labels"] != -100).sum()) == len(all_ex["input_ids"]) - 1


def test_dolly_category_filter_and_prompt(gpt2_tok: Any, tmp_path: Path) -> None:
    path = _write(tmp_path, DOLLY)
    out = _build(path, gpt2_tok, format="dolly", category=["open_qa"])
    assert out.stats.filtered_category == 2 and out.stats.examples == 2
    assert _targets(gpt2_tok, out.train[0]) == "William Shakespeare.<|endoftext|>"
    ctx = _build(path, gpt2_tok, format="dolly", category="summarization").train[0]
    assert "### Input:\nCats sleep a lot." in gpt2_tok.decode(ctx["input_ids"])
    with pytest.raises(TunesmithError, match=r"sft.category=\['closed_qa'\] matched none of the 4 "
                       r"records.*categories present: brainstorming, open_qa, summarization"):
        _build(path, gpt2_tok, format="dolly", category="closed_qa")


def test_summarization_samsum_schema(gpt2_tok: Any, tmp_path: Path) -> None:
    out = _build(_write(tmp_path, SAMSUM, "samsum.json"), gpt2_tok, format="summarization")
    text = gpt2_tok.decode(out.train[1]["input_ids"])
    assert text.startswith("Summarize this dialogue:\nOlivia: Who are you voting for?")
    assert _targets(gpt2_tok, out.train[1]) == SAMSUM[1]["summary"] + "<|endoftext|>"


def test_custom_templates_and_field_renames(gpt2_tok: Any, tmp_path: Path) -> None:
    recs = [{"quote": "Be yourself.", "author": "Oscar Wilde", "tags": ["self"]}]
    path = _write(tmp_path, recs)
    out = _build(path, gpt2_tok, format="custom", prompt_template="Quote by {author}: ",
                 response_template="{quote}")
    assert gpt2_tok.decode(out.train[0]["input_ids"]).startswith("Quote by Oscar Wilde: Be")
    # GPT-2 merges the prompt's trailing space into " Be": that token completes the response.
    assert _targets(gpt2_tok, out.train[0]) == " Be yourself.<|endoftext|>"
    with pytest.raises(TunesmithError, match=r"record 1 \(line 1\): missing field 'speaker'"):
        _build(path, gpt2_tok, format="custom", prompt_template="{speaker}",
               response_template="{quote}")
    renamed = _build(_write(tmp_path, [{"instruction": "Hi", "answer": "Yo"}], "r.json"),
                     gpt2_tok, fields={"output": "answer"})
    assert _targets(gpt2_tok, renamed.train[0]) == "Yo<|endoftext|>"


@pytest.mark.parametrize("template", ["llama3", "alpaca"])
def test_builtin_chat_templates_mask_all_but_assistant(llama3_tok: Any, tmp_path: Path,
                                                       template: str) -> None:
    out = _build(_write(tmp_path, CHAT), llama3_tok, format="chat", chat_template=template)
    ex = out.train[0]
    full = llama3_tok.decode(ex["input_ids"])
    end = "<|eot_id|>" if template == "llama3" else "<|end_of_text|>"
    assert _targets(llama3_tok, ex) == f"Hello.{end}4{end}"
    assert full.startswith("<|begin_of_text|>") and full.count("<|begin_of_text|>") == 1
    assert "Be brief." in full and "2+2?" in full
    if template == "llama3":
        assert "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>" in full


def test_tokenizer_chat_template_and_sharegpt(gpt2_tok: Any, tmp_path: Path) -> None:
    with pytest.raises(TunesmithError, match=r"has no chat template; set sft.chat_template"):
        _build(_write(tmp_path, CHAT), gpt2_tok, format="chat")
    gpt2_tok.chat_template = PLAIN_TEMPLATE
    try:
        for recs, fmt in ((CHAT, "chat"), (SHAREGPT, "sharegpt")):
            ex = _build(_write(tmp_path, recs), gpt2_tok, format=fmt).train[0]
            # Trained: each answer (with the space GPT-2 merges into its first token) and the
            # newline the template puts after it; never the role headers.
            assert _targets(gpt2_tok, ex) == " Hello.\n 4\n"
            assert gpt2_tok.decode(ex["input_ids"]).startswith(
                "<system>: Be brief.\n" if fmt == "chat" else "<user>: Hi!\n")
    finally:
        gpt2_tok.chat_template = None
    with pytest.raises(TunesmithError, match=r"chat template 'chatml' needs the special tokens"):
        _build(_write(tmp_path, CHAT), gpt2_tok, format="chat", chat_template="chatml")


@pytest.mark.parametrize("record, pattern", [
    ({"input": "x", "output": "y"}, r"record 2: missing field 'instruction'"),
    ({"instruction": "x", "output": 3}, r"record 2: field 'output' holds int, expected a string"),
    ({"instruction": "x", "output": "  "}, r"record 2: empty response in field 'output'"),
    (["not", "an", "object"], r"record 2: expected a JSON object, got list"),
    ({"instruction": "x", "output": None}, r"record 2: null field 'output'"),
])
def test_bad_records_name_index_and_field(gpt2_tok: Any, tmp_path: Path, record: Any,
                                          pattern: str) -> None:
    path = _write(tmp_path, [{"instruction": "a", "output": "b"}, record], "bad.json")
    with pytest.raises(InvalidRecord, match=pattern) as info:
        _build(path, gpt2_tok)
    assert "\n" not in str(info.value)
    out = _build(path, gpt2_tok, invalid="skip")
    assert out.stats.invalid_skipped == 1 and out.stats.examples == 1


@pytest.mark.parametrize("messages, pattern", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ([{"role": "user"}], r"messages\[0\]: missing field 'content'"),
    ("hello", "must be a non-empty list of messages"),
])
def test_bad_chat_records(llama3_tok: Any, messages: Any, pattern: str) -> None:
    fmt = SFTFormatter(SFTConfig(format="chat", chat_template="llama3"), llama3_tok)
    with pytest.raises(InvalidRecord, match=pattern):
        fmt({"messages": messages}, "f.jsonl:3")


def test_overlong_policies(gpt2_tok: Any, tmp_path: Path) -> None:
    recs = [{"instruction": "short", "output": "ok"},
            {"instruction": "long " * 80, "output": "fine answer"}]
    path = _write(tmp_path, recs)
    cut = _build(path, gpt2_tok, block=64)
    # Truncated inside the prompt: no response left, so the example is dropped and counted.
    assert cut.stats.truncated == 1 and cut.stats.dropped_no_target == 1 and len(cut.train) == 1
    dropped = _build(path, gpt2_tok, block=64, overlong="drop")
    assert dropped.stats.dropped_overlong == 1 and len(dropped.train) == 1
    with pytest.raises(TunesmithError, match=r"record 2 \(line 2\): example has \d+ tokens, "
                       r"more than data.block_size=64"):
        _build(path, gpt2_tok, block=64, overlong="error")


def test_packed_collator_keeps_documents_apart(gpt2_tok: Any, tmp_path: Path) -> None:
    recs = [{"instruction": f"q{i}", "output": "a" * (i + 1)} for i in range(6)]
    out = _build(_write(tmp_path, recs), gpt2_tok, block=80, packing=True)
    assert out.stats.packed_rows == len(out.train) < 6
    batch = SFTCollator(gpt2_tok.eos_token_id)([out.train[i] for i in range(len(out.train))])
    docs, pos, labels = batch["doc_ids"], batch["position_ids"], batch["labels"]
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    assert bool((pos[starts] == 0).all())  # positions restart in every example
    last = torch.zeros_like(docs, dtype=torch.bool)
    last[:, :-1] = docs[:, 1:] != docs[:, :-1]
    assert bool((labels[last] == -100).all())  # no label crosses into the next example
    assert int((labels != -100).sum()) == out.stats.target_tokens


def test_every_format_on_real_alpaca_records(llama3_tok: Any, tmp_path: Path) -> None:
    """The real Alpaca records, re-shaped into each schema, give the same trained text."""
    real = [r for r in json.loads(shared_path(*ALPACA).read_text())[:12] if r["output"].strip()]
    shapes: dict[str, tuple[list, dict]] = {
        "dolly": ([{"instruction": r["instruction"], "context": r["input"],
                    "response": r["output"], "category": "closed_qa" if r["input"] else "open_qa"}
                   for r in real], {}),
        "summarization": ([{"id": str(i), "dialogue": r["instruction"], "summary": r["output"]}
                           for i, r in enumerate(real)], {}),
        "chat": ([{"messages": [{"role": "user", "content": r["instruction"]},
                                {"role": "assistant", "content": r["output"]}]} for r in real],
                 {"chat_template": "llama3"}),
        "sharegpt": ([{"conversations": [{"from": "human", "value": r["instruction"]},
                                         {"from": "gpt", "value": r["output"]}]} for r in real],
                     {"chat_template": "llama3"}),
        "custom": (real, {"prompt_template": "Q: {instruction}\nA:", "response_template":
                          " {output}"}),
    }
    for fmt, (records, extra) in shapes.items():
        out = _build(_write(tmp_path, records, f"{fmt}.jsonl"), llama3_tok, block=1024,
                     format=fmt, **extra)
        assert out.stats.examples == len(real), fmt
        for ex, r in zip(out.train, real):
            got = _targets(llama3_tok, ex)
            chat = fmt in ("chat", "sharegpt")  # the llama3 template trims turns
            end = "<|eot_id|>" if chat else "<|end_of_text|>"
            expected = r["output"].strip() if chat else r["output"]
            assert got.strip() == (expected + end).strip(), (fmt, got)


@pytest.mark.parametrize("fmt, records, user, answer", [
    ("alpaca", [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}],
     "Add the numbers.\n\n2 and 3", "5"),
    ("dolly", DOLLY[1:2], "Summarize the text.\n\nCats sleep a lot. They purr.",
     "Cats sleep and purr."),
])
def test_alpaca_and_dolly_through_a_chat_template(llama3_tok: Any, tmp_path: Path, fmt: str,
                                                  records: list, user: str, answer: str) -> None:
    """With sft.chat_template set, an instruction record is a user turn and an assistant turn
    rendered through the template (not the Alpaca prompt with the template ignored)."""
    out = _build(_write(tmp_path, records), llama3_tok, format=fmt, chat_template="llama3")
    ex = out.train[0]
    full = llama3_tok.decode(ex["input_ids"])
    assert f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>" in full
    assert f"<|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>" in full
    assert "### Instruction" not in full and "Below is an instruction" not in full
    assert _targets(llama3_tok, ex) == f"{answer}<|eot_id|>"  # only the answer is trained
    plain = _build(_write(tmp_path, records, "p.jsonl"), llama3_tok, format=fmt)
    assert "### Instruction:" in llama3_tok.decode(plain.train[0]["input_ids"])  # default kept
