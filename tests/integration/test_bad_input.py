"""Bad input: one clear line naming the problem, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny_overrides
from tunesmith.cli.main import run


def _train(tmp_path, tok_dir, data, capsys, recipe_text="{}\n", **extra):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "out"
    code = run(["train", str(recipe), *tiny_overrides(tok_dir, out, data, **extra)])
    err = capsys.readouterr().err
    return code, err, out


def _assert_clean_failure(code, err, out, *needles):
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("tunesmith: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    # Nothing written that could pass for a finished (or even a started) run.
    assert not (out / "final").exists() and not (out / "config.yaml").exists()


def test_missing_data_file(tmp_path, tiny_tokenizer_dir, capsys):
    missing = tmp_path / "nope.txt"
    _assert_clean_failure(*_train(tmp_path, tiny_tokenizer_dir, missing, capsys), str(missing))


def test_unreadable_data_file(tmp_path, tiny_tokenizer_dir, capsys, monkeypatch):
    data = tmp_path / "locked.txt"
    data.write_text("some text\n" * 50)
    real_open = open

    def guarded_open(file, *a, **k):  # chmod 000 does not stop root, so simulate EACCES
        if str(file) == str(data):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", guarded_open)
    code, err, out = _train(tmp_path, tiny_tokenizer_dir, data, capsys)
    _assert_clean_failure(code, err, out, str(data))


def test_empty_dataset(tmp_path, tiny_tokenizer_dir, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    _assert_clean_failure(*_train(tmp_path, tiny_tokenizer_dir, data, capsys), "empty", str(data))


def test_text_column_not_found_lists_columns(tmp_path, tiny_tokenizer_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"content": "hello", "id": i}) + "\n" for i in range(5)))
    code, err, out = _train(tmp_path, tiny_tokenizer_dir, data, capsys)
    _assert_clean_failure(code, err, out, "'text'", "content", "id")


def test_malformed_json_line_names_file_and_line(tmp_path, tiny_tokenizer_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",\n')
    _assert_clean_failure(*_train(tmp_path, tiny_tokenizer_dir, data, capsys), f"{data}:3")


def test_non_utf8_bytes(tmp_path, tiny_tokenizer_dir, capsys):
    data = tmp_path / "latin1.txt"
    data.write_bytes("good line\n".encode() * 3 + "caf\xe9 au lait\n".encode("latin-1"))
    _assert_clean_failure(*_train(tmp_path, tiny_tokenizer_dir, data, capsys), str(data), "UTF-8")


def test_invalid_yaml_line_column(tmp_path, tiny_tokenizer_dir, demo_text, capsys):
    code, err, out = _train(tmp_path, tiny_tokenizer_dir, demo_text[0], capsys,
                            recipe_text="train:\n  seed: 1\n eval: [\n")
    _assert_clean_failure(code, err, out, "invalid YAML", "recipe.yaml:3:2")


def test_unknown_model_type(tmp_path, tiny_tokenizer_dir, demo_text, capsys):
    model_dir = tmp_path / "weird"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "mamba9", "vocab_size": 10}))
    code, err, out = _train(tmp_path, tiny_tokenizer_dir, demo_text[0], capsys,
                            **{"model.name": model_dir})
    _assert_clean_failure(code, err, out, "mamba9", "llama")


def test_block_size_larger_than_positions(tmp_path, tiny_tokenizer_dir, demo_text, capsys):
    code, err, out = _train(tmp_path, tiny_tokenizer_dir, demo_text[0], capsys,
                            **{"data.block_size": 4096})
    _assert_clean_failure(code, err, out, "4096", "512")


def test_output_dir_holding_another_run(tmp_path, tiny_tokenizer_dir, demo_text, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("previous: run\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    code, err, _ = _train(tmp_path, tiny_tokenizer_dir, demo_text[0], capsys)
    assert code == 2 and "holds another run" in err and "output.overwrite=true" in err
    # The earlier run's files are untouched.
    assert (out / "config.yaml").read_text() == "previous: run\n"
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_unknown_config_key_suggests(tmp_path, tiny_tokenizer_dir, demo_text, capsys):
    code, err, out = _train(tmp_path, tiny_tokenizer_dir, demo_text[0], capsys,
                            **{"optim.learning_rate": 0.1})
    _assert_clean_failure(code, err, out, "unknown key 'optim.learning_rate'")


def test_process_exit_code_and_debug_traceback(tmp_path):
    """As a user sees it: a real process, exit status 2, one line; --debug shows the traceback."""
    cmd = [sys.executable, "-m", "tunesmith", "train", str(tmp_path / "missing.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"tunesmith: error: recipe not found: {tmp_path / 'missing.yaml'}"]
    dbg = subprocess.run([sys.executable, "-m", "tunesmith", "--debug", *cmd[3:]],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert dbg.returncode != 0 and "Traceback" in dbg.stderr


@pytest.mark.parametrize("argv, needle", [
    (["eval", "/nonexistent/model", "--data", "x.txt"], "/nonexistent/model"),
    (["generate", "/nonexistent/model", "--prompt", "hi"], "/nonexistent/model"),
])
def test_eval_generate_missing_model(argv, needle, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
