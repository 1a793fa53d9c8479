"""A battery of bad input, one kind per test: the one `error:` line names what and where, the
exit code is 2, there is no traceback, and nothing half-written is left behind.

Everything runs in-process through `tunesmith.cli.main.run` (argparse failures surface as
SystemExit(2)); the few cases that need a model use a copy of the tiny real stories260K model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import shared_path, tiny_overrides
from tunesmith.cli.main import run


# ----------------------------------------------------------------------------- helpers
def _snapshot(*dirs: Path) -> dict[str, str]:
    """Path -> sha256 of every file under `dirs` (what "nothing changed" compares)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs if d.exists() for p in sorted(d.rglob("*")) if p.is_file()}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = run([str(a) for a in argv])
    except SystemExit as e:  # argparse rejects a flag before any work starts
        code = e.code
    return code, capsys.readouterr().err


def fails(argv: list[str], capsys, *needles: str, absent: tuple[Path, ...] = (),
          unchanged: tuple[Path, ...] = ()) -> str:
    """Run `argv`; assert exit 2, exactly one error line holding every needle, no traceback,
    the `absent` paths not created and the `unchanged` trees byte-identical."""
    before = _snapshot(*unchanged)
    code, err = _run(argv, capsys)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if "error" in ln and ": error" in ln]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in err, err
    for path in absent:
        assert not path.exists(), f"{path} was written"
    assert _snapshot(*unchanged) == before
    return lines[0]


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    """A private copy of the real stories260K model (1 MB), free to damage."""
    d = tmp_path / "model"
    shutil.copytree(shared_path("models", "stories260K", "hf"), d)
    return d


def _edit_config(model: Path, **fields) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(fields)
    (model / "config.json").write_text(json.dumps(cfg))


def _train_argv(tok: Path, out: Path, data: Path, *extra: str, recipe: Path | None = None):
    return ["train", *([recipe] if recipe else []), *tiny_overrides(tok, out, data), *extra]


# ------------------------------------------------------------ 1. corrupt weight files
@pytest.mark.parametrize("damage, needle", [
    ("truncate", "incomplete metadata"),
    ("empty", "0 bytes"),
    ("garbage", "header too large"),
    ("huge_header", "header too large"),
])
@pytest.mark.parametrize("command", ["generate", "train"])
def test_corrupt_safetensors(model_dir, tmp_path, demo_text, damage, needle, command, capsys):
    weights = model_dir / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes({"truncate": raw[: len(raw) // 2], "empty": b"",
                         "garbage": b"\xff" * 8 + b"not a safetensors header" * 20,
                         "huge_header": (10**12).to_bytes(8, "little") + b"{}"}[damage])
    out = tmp_path / "out"
    if command == "generate":
        argv = ["generate", model_dir, "--prompt", "Once", "--max-new-tokens", "2"]
    else:
        argv = ["train", f"model.name={model_dir}", f"data.path={demo_text[0]}",
                f"output.dir={out}", "train.max_steps=1", "data.block_size=32"]
    line = fails(argv, capsys, str(weights), needle, "damaged or incomplete", absent=(out,),
                 unchanged=(model_dir,))
    assert "not a readable safetensors file" in line


@pytest.mark.parametrize("field, value, needle", [
    ("hidden_size", "big", "'hidden_size' must be an integer, got 'big'"),
    ("num_hidden_layers", None, "'num_hidden_layers' must be an integer, got None"),
    ("rms_norm_eps", [1e-5], "'rms_norm_eps' must be a number"),
    ("tie_word_embeddings", "yes", "'tie_word_embeddings' must be true or false"),
    ("eos_token_id", "2", "'eos_token_id' must be a token id"),
])
def test_config_json_wrong_types(model_dir, field, value, needle, capsys):
    _edit_config(model_dir, **{field: value})
    fails(["generate", model_dir, "--prompt", "Once"], capsys, str(model_dir / "config.json"), needle)


def test_config_json_not_utf8(model_dir, capsys):
    (model_dir / "config.json").write_bytes(b'{"model_type": "ll\xe9ama"}')
    fails(["eval", model_dir, "--data", model_dir / "config.json"], capsys,
          str(model_dir / "config.json"), "not UTF-8")


def test_config_json_cut_short(model_dir, capsys):
    (model_dir / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    fails(["generate", model_dir, "--prompt", "x"], capsys, str(model_dir / "config.json"),
          "invalid JSON")


def test_sharded_index_missing_shard(model_dir, capsys):
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(["generate", model_dir, "--prompt", "x"], capsys, "model-00002-of-00002.safetensors",
          "missing")


def test_garbage_pickle_weights(model_dir, capsys):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"this is not a pickle at all")
    fails(["generate", model_dir, "--prompt", "x"], capsys, str(model_dir / "pytorch_model.bin"))


def test_missing_weights(model_dir, capsys):
    (model_dir / "model.safetensors").unlink()
    fails(["generate", model_dir, "--prompt", "x"], capsys, "no weights in", str(model_dir))


@pytest.mark.parametrize("layout, needles", [
    ({"manifest.json": "{}"}, ("it is a training checkpoint", "tunesmith export")),
    ({"final/config.json": "{}", "metrics.jsonl": ""}, ("it is a run directory; its model is",)),
    ({"checkpoints/step_00000002/manifest.json": "{}"}, ("run directory without final/",
                                                         "tunesmith export")),
    ({"adapter_config.json": "{}"}, ("it is a PEFT adapter", "peft.from_checkpoint")),
    ({}, ("has no config.json",)),
])
def test_model_argument_that_is_not_a_model_says_what_it_is(layout, needles, tmp_path, capsys):
    """What new users pass to eval/generate/train as the model: a run directory, a training
    checkpoint, an adapter. The one line names what it is and what to pass instead."""
    model = tmp_path / "thing"
    for rel, text in layout.items():
        (model / rel).parent.mkdir(parents=True, exist_ok=True)
        (model / rel).write_text(text)
    model.mkdir(exist_ok=True)
    if "adapter_config.json" in layout:  # eval/generate take adapters; train needs the base
        text = tmp_path / "t.txt"
        text.write_text("Once upon a time\n" * 50)
        fails(["train", f"model.name={model}", f"data.path={text}",
               f"output.dir={tmp_path / 'out'}"], capsys, str(model), *needles,
              absent=(tmp_path / "out",))
    else:
        fails(["generate", model, "--prompt", "x"], capsys, str(model), *needles)


def test_model_argument_that_is_a_data_file(tmp_path, capsys):
    text = tmp_path / "my.txt"
    text.write_text("Once upon a time\n")
    fails(["eval", text, "--data", text], capsys,
          f"model {text} is a file, not a model directory or its config.json")


# ------------------------------------------------------------ 2. YAML and CSV
def test_yaml_duplicate_key_names_both_lines(tmp_path, tiny_tokenizer_dir, demo_text, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 1.0e-3\n  weight_decay: 0.1\n  lr: 3.0e-4\n")
    out = tmp_path / "out"
    fails(_train_argv(tiny_tokenizer_dir, out, demo_text[0], recipe=recipe), capsys,
          "duplicate key 'lr'", str(recipe), "line 2", "line 4", absent=(out,))


def test_yaml_duplicate_section(tmp_path, tiny_tokenizer_dir, demo_text, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {max_steps: 3}\ndata: {block_size: 32}\ntrain: {seed: 1}\n")
    out = tmp_path / "out"
    fails(_train_argv(tiny_tokenizer_dir, out, demo_text[0], recipe=recipe), capsys,
          "duplicate key 'train'", "line 1", "line 3", absent=(out,))


def test_yaml_top_level_list(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- model\n- data\n")
    fails(["train", recipe], capsys, str(recipe), "mapping of sections")


def test_yaml_not_utf8(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"optim: {lr: 1.0e-3}  # caf\xe9\n")
    fails(["train", recipe], capsys, str(recipe), "not UTF-8")


def test_override_without_equals(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    fails(["train", recipe, "optim.lr"], capsys, "'optim.lr'", "section.key=value")


def test_override_wrong_type(tmp_path, tiny_tokenizer_dir, demo_text, capsys):
    out = tmp_path / "out"
    fails(_train_argv(tiny_tokenizer_dir, out, demo_text[0], "optim.lr=fast"), capsys,
          "optim.lr", "'fast'", absent=(out,))


def test_training_set_smaller_than_one_batch(tmp_path, tiny_tokenizer_dir, capsys):
    """A small SFT/CLM file packs into fewer rows than one micro-batch: the line names the data
    and the keys to change (it said only 'dataset has 4 examples')."""
    data = tmp_path / "small.txt"
    data.write_text("Once upon a time there was a tiny file.\n" * 400)
    out = tmp_path / "out"
    fails(_train_argv(tiny_tokenizer_dir, out, data, "train.micro_batch_size=512"), capsys,
          f"the training set of {data} has", "train.micro_batch_size=512 x 1 rank(s)",
          "data.drop_last=false", absent=(out,))


def test_override_negative_block_size(tmp_path, tiny_tokenizer_dir, demo_text, capsys):
    out = tmp_path / "out"
    fails(_train_argv(tiny_tokenizer_dir, out, demo_text[0], "data.block_size=-8"), capsys,
          "data.block_size", "greater than 0", absent=(out,))


def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text("id,text\n" + "".join(r + "\n" for r in rows))
    return path


GOOD_ROWS = [f'{i},"row number {i} of a csv file, with a comma"' for i in range(60)]


@pytest.mark.parametrize("bad_row, fields", [("61,too,many,fields", 4), ("lonely", 1)])
def test_csv_row_width(tmp_path, tiny_tokenizer_dir, bad_row, fields, capsys):
    data = _csv(tmp_path / "d.csv", GOOD_ROWS[:30] + [bad_row] + GOOD_ROWS[30:])
    out = tmp_path / "out"
    fails(_train_argv(tiny_tokenizer_dir, out, data), capsys, f"{data}:32",
          f"row has {fields} fields, the header has 2", "data.csv_bad_rows=skip", absent=(out,))


def test_csv_row_width_sft_records(tmp_path, tiny_tokenizer_dir, capsys):
    data = tmp_path / "alpaca.csv"
    data.write_text("instruction,input,output\n" + "Say hi,,hi\n" * 20 + "Say,bye\n")
    out = tmp_path / "out"
    fails(_train_argv(tiny_tokenizer_dir, out, data, "task=sft", "sft.format=alpaca"), capsys,
          f"{data}:22", "row has 2 fields, the header has 3", absent=(out,))


def test_unknown_chat_template_for_alpaca(tmp_path, tiny_tokenizer_dir, capsys):
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"instruction": "Hi", "input": "", "output": "Yo"}) + "\n")
    out = tmp_path / "out"
    fails(_train_argv(tiny_tokenizer_dir, out, data, "task=sft", "sft.format=alpaca",
                      "sft.chat_template=vicuna"), capsys, "sft.chat_template='vicuna'",
          "known: tokenizer", absent=(out,))


def test_csv_bad_rows_skipped_on_request(tmp_path, tiny_tokenizer_dir, capsys, caplog):
    data = _csv(tmp_path / "d.csv", GOOD_ROWS[:30] + ["x,y,z", "w"] + GOOD_ROWS[30:])
    out = tmp_path / "out"
    argv = _train_argv(tiny_tokenizer_dir, out, data, "data.csv_bad_rows=skip",
                       "train.max_steps=1", "schedule.warmup_steps=0", "data.block_size=32",
                       "output.save_final=false")
    code, err = _run(argv, capsys)
    assert code == 0, err
    assert "skipped 2 row(s)" in caplog.text and f"{data}" in caplog.text
    assert "first at line 32" in caplog.text


# ------------------------------------------------------------ 3. CLI flags, every command
FLAG_CASES = [
    (["eval", "M", "--data", "D", "--max-batches", "0"], "--max-batches", ">= 1"),
    (["eval", "M", "--data", "D", "--block-size", "0"], "--block-size", ">= 1"),
    (["eval", "M", "--data", "D", "--block-size", "-5"], "--block-size", "'-5'"),
    (["eval", "M", "--data", "D", "--block-size", "big"], "--block-size", "an integer"),
    (["eval", "M", "--data", "D", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["eval", "M", "--data", "D", "--max-new-tokens", "0"], "--max-new-tokens", ">= 1"),
    (["eval", "M", "--data", "D", "--max-samples", "-1"], "--max-samples", ">= 1"),
    (["eval", "M", "--data", "D", "--text-column", " "], "--text-column", "empty"),
    (["eval", "M", "--data", ""], "--data", "empty"),
    (["eval", "M", "--data", "D", "--device", "tpu"], "--device", "invalid choice"),
    (["eval", "M", "--data", "D", "--precision", "int4"], "--precision", "invalid choice"),
    (["eval", "M"], "--data", "--harness"),
    (["eval", "M", "--harness", "t", "--limit", "0"], "--limit", ">= 1"),
    (["eval", "M", "--harness", "t", "--num-fewshot", "-1"], "--num-fewshot", ">= 0"),
    (["eval", "M", "--harness", " "], "--harness", "empty"),
    (["generate", "M", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens", ">= 1"),
    (["generate", "M", "--prompt", "x", "--temperature", "-1"], "--temperature", ">= 0"),
    (["generate", "M", "--prompt", "x", "--temperature", "nan"], "--temperature", "finite"),
    (["generate", "M", "--prompt", "x", "--top-k", "0"], "--top-k", ">= 1"),
    (["generate", "M", "--prompt", "x", "--seed", "-1"], "--seed", ">= 0"),
    (["generate", "M", "--prompt", ""], "--prompt", "empty"),
    (["export", "C", "--out", "O", "--max-shard-size", "5XB"], "--max-shard-size", "5GB"),
    (["export", "C", "--out", "O", "--max-shard-size", "0"], "--max-shard-size", "at least 1"),
    (["export", "C", "--out", "O", "--dtype", "int8"], "--dtype", "invalid choice"),
    (["merge", "B", "A", "--out", "O", "--dtype", "fp8"], "--dtype", "invalid choice"),
    (["merge", "B", "A"], "--out", "required"),
    (["demo", "--steps", "0"], "--steps", ">= 1"),
    (["demo", "--steps", "-3"], "--steps", ">= 1"),
    (["demo", "--steps", "1.5"], "--steps", "an integer"),
    (["launch", "--nproc-per-node", "x", "R"], "--nproc-per-node", "invalid int"),
    (["nonsense"], "COMMAND", "invalid choice"),
    (["data", "inspect", "R", "--n", "0"], "--n", ">= 1"),
    (["data", "bogus"], "ACTION", "invalid choice"),
]


@pytest.mark.parametrize("argv, flag, needle", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_cli_flags_validated(argv, flag, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative O / D / M: nothing may appear here
    line = fails(argv, capsys, flag, needle)
    assert line.startswith("tunesmith")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, want", [
    (["export", "C", "--out", "O", "--dtype", "bf16"], "bfloat16"),
    (["export", "C", "--out", "O", "--dtype", "FP32"], "float32"),
    (["export", "C", "--out", "O", "--dtype", "float16"], "float16"),
    (["merge", "B", "A", "--out", "O", "--dtype", "bfloat16"], "bf16"),
    (["merge", "B", "A", "--out", "O", "--dtype", "fp16"], "fp16"),
    (["merge", "B", "A", "--out", "O"], "auto"),
])
def test_dtype_flags_take_both_spellings(argv, want):
    """export spelled dtypes as torch (bfloat16) and merge as the config (bf16): a user who
    typed the other command's spelling got 'invalid choice'. Both now take both."""
    from tunesmith.cli.main import build_parser

    assert build_parser().parse_args(argv).dtype == want


@pytest.mark.parametrize("flags, needle", [
    (["--nproc-per-node", "0"], "--nproc-per-node and --nnodes must be >= 1"),
    (["--nproc-per-node", "1", "--max-restarts", "-1"], "--max-restarts must be >= 0"),
    (["--nproc-per-node", "1", "--nnodes", "2", "--node-rank", "2",
      "--rdzv-endpoint", "h:1"], "--node-rank must be in [0, 2)"),
])
def test_launch_flags_validated(flags, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fails(["launch", *flags, "data.path=x.txt"], capsys, needle)
    assert list(tmp_path.iterdir()) == []


def test_demo_steps_zero_writes_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    fails(["demo", "--output", out, "--steps", "0"], capsys, "--steps", absent=(out,))


def test_eval_block_size_beyond_positions(model_dir, demo_text, capsys):
    fails(["eval", model_dir, "--data", demo_text[1], "--block-size", "100000"], capsys,
          "100000")


def test_eval_missing_data(model_dir, tmp_path, capsys):
    fails(["eval", model_dir, "--data", tmp_path / "nope.txt"], capsys, str(tmp_path / "nope.txt"))


def test_no_metric_over_zero_tokens():
    from tunesmith.errors import TunesmithError
    from tunesmith.eval.perplexity import eval_metrics

    assert eval_metrics(6.0, 3)["eval_loss"] == 2.0
    with pytest.raises(TunesmithError, match="no target tokens"):
        eval_metrics(0.0, 0)


def test_eval_generate_no_records(tmp_path, model_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("")
    fails(["eval", model_dir, "--data", data, "--generate", "--format", "alpaca",
           "--output", tmp_path / "preds.jsonl"], capsys, str(data), "no usable SFT records",
          absent=(tmp_path / "preds.jsonl",))


def test_eval_generate_output_that_cannot_be_a_file(tmp_path, model_dir, capsys):
    """--output naming a directory was an IsADirectoryError traceback after every prompt was
    answered; a parent that is a file was a FileExistsError. Both are one line now."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    folder = tmp_path / "preds"
    folder.mkdir()
    fails(["eval", model_dir, "--data", data, "--generate", "--format", "alpaca",
           "--max-new-tokens", "2", "--output", folder], capsys,
          f"--output {folder} is a directory; give a file name", absent=(tmp_path / "preds.tmp",))
    (tmp_path / "afile").write_text("x")
    fails(["eval", model_dir, "--data", data, "--generate", "--format", "alpaca",
           "--max-new-tokens", "2", "--output", tmp_path / "afile" / "p.jsonl"], capsys,
          f"cannot write predictions file {tmp_path / 'afile' / 'p.jsonl'} (File exists: ")
    assert not list(tmp_path.glob("**/*.tmp")) and not any(folder.iterdir())


def test_eval_text_shorter_than_block(tmp_path, model_dir, capsys):
    data = tmp_path / "short.txt"
    data.write_text("Once upon a time.\n")
    fails(["eval", model_dir, "--data", data, "--block-size", "256"], capsys, str(data),
          "fewer than one block of --block-size=256")


# ------------------------------------------------------------ 5. resuming a finished run
def test_resume_finished_run_changes_nothing(tmp_path, tiny_tokenizer_dir, demo_text, capsys,
                                             caplog):
    out = tmp_path / "run"
    argv = _train_argv(tiny_tokenizer_dir, out, demo_text[0], "train.max_steps=4",
                       "schedule.warmup_steps=0", "checkpoint.every_steps=2",
                       "data.block_size=32", "data.max_train_samples=64")
    assert _run(argv, capsys)[0] == 0
    before = _snapshot(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_loss"] is not None
    code, _ = _run([*argv, "checkpoint.resume=auto"], capsys)
    assert code == 0
    assert _snapshot(out) == before  # metrics.jsonl, summary.json, final/, checkpoints
    assert "already finished at step 4" in caplog.text and "left as they were" in caplog.text
