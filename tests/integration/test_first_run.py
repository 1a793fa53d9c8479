"""What a newcomer meets in the first minutes (issue #17): the usage of `train` without
arguments, messages in the project's own voice (no noise before an error, no terminal codes),
and errors that name what the user set."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from tests.conftest import tiny_overrides
from tunesmith.cli.main import run


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("tunesmith: error:")]


def test_train_without_arguments_explains_what_it_needs(capsys):
    assert run(["train"]) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert "recipe" in line and "section.key=value" in line and "tunesmith train --help" in line
    assert "required" not in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        run(["train", "--help"])
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith("usage: tunesmith train [-h] [RECIPE] [section.key=value ...]")


def test_unwritable_output_dir_is_named_as_output_dir(tmp_path, tiny_tokenizer_dir, demo_text,
                                                       capsys, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "run"  # mkdir fails even for root (CI runs as root; chmod would not stop it)
    caplog.set_level(logging.INFO, logger="tunesmith")
    argv = ["train", *tiny_overrides(tiny_tokenizer_dir, out, demo_text[0]),
            "train.precision=bf16", "train.device=cpu"]
    assert run(argv) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert line == f"tunesmith: error: output.dir {out} is not writable: Not a directory"
    # Nothing about precision is said before an error.
    assert not [r for r in caplog.records if "precision" in r.getMessage()]


def test_cpu_precision_note_is_said_once_in_the_model_line(tmp_path, tiny_tokenizer_dir,
                                                           demo_text, capsys, caplog):
    caplog.set_level(logging.INFO, logger="tunesmith")
    argv = ["train", *tiny_overrides(tiny_tokenizer_dir, tmp_path / "run", demo_text[0],
                                     **{"train.max_steps": 2, "schedule.warmup_steps": 1})]
    assert run([*argv, "train.precision=bf16", "train.device=cpu"]) == 0
    said = [r.getMessage() for r in caplog.records if "precision" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("model tiny: ")
    assert "(fp32: train.precision=bf16 is used on GPUs only)" in said[0]
    caplog.clear()
    assert run([*argv, "train.precision=fp32", "output.overwrite=true"]) == 0
    assert not [r for r in caplog.records if "precision" in r.getMessage()]


def test_pickle_refusal_is_one_plain_line(tmp_path, capsys):
    from tunesmith.models import build_model, resolve_model_config, save_pretrained

    family, cfg = resolve_model_config("tiny", {"vocab_size": 64, "dim": 32, "n_layers": 1,
                                                "n_heads": 2, "n_kv_heads": 2,
                                                "intermediate_size": 64})
    model = build_model(family, cfg, device="cpu")
    save_pretrained(model, family, cfg, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    # A pickle that names a global outside torch's weights-only allowlist.
    torch.save({**model.state_dict(), "extra": argparse.Namespace(a=1)},
               tmp_path / "m" / "pytorch_model.bin")
    assert run(["generate", str(tmp_path / "m"), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert "\x1b" not in err and "[1m" not in err
    assert "it references argparse.Namespace" in line and "allow_unsafe_pickle" in line
