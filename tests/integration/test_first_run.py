"""What a newcomer meets in the first minutes (issue #17): the usage of `train` without
arguments, messages in the project's own voice (no noise before an error, no terminal codes),
and errors that name what the user set."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, tiny_overrides
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


@pytest.mark.slow
def test_demo_keeps_an_earlier_demo_and_prints_plain_text(tmp_path):
    """The demo command as a user runs it, output piped (not a terminal)."""
    out = tmp_path / "demo"
    stale = out / "run" / "metrics.jsonl"  # an earlier demo's records
    stale.parent.mkdir(parents=True)
    stale.write_text('{"step": 1, "loss": 9.0}\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_DATASETS_DISABLE", "HF_HUB_DISABLE", "OMP_", "RAYON_"))}
    env["PYTHONPATH"] = str(REPO / "src")
    cmd = [sys.executable, "-m", "tunesmith", "demo", "--output", str(out), "--steps", "2"]

    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == (f"tunesmith: error: {out} holds an earlier demo (run); add "
                              "--overwrite to replace it, or choose another --output\n")
    assert stale.read_text() == '{"step": 1, "loss": 9.0}\n' and not (out / "data").exists()

    done = subprocess.run([*cmd, "--overwrite"], env=env, capture_output=True, text=True, check=False,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    # The earlier record is gone (match the whole record: a new throughput like 1209.0903
    # may contain "9.0").
    assert '"loss": 9.0}' not in stale.read_text()
    assert (out / "run" / "final" / "model.safetensors").exists()
    # The sample is text on its own indented lines, not a Python repr with \n escapes.
    lines = done.stdout.splitlines()
    at = lines.index("sample (greedy, 40 new tokens after 'The list'):")
    assert lines[at + 1].startswith("    The list")
    assert "\\n" not in done.stdout and "sample: '" not in done.stdout
    # stderr off a terminal: no tqdm redraws, no precision remark (the demo runs fp32 on CPU).
    assert "\r" not in done.stderr and "%|" not in done.stderr and "tokenizing" not in done.stderr
    assert "precision" not in done.stderr
    # the demo's model config carries its own tokenizer's special-token ids: nothing to correct
    assert "special tokens" not in done.stderr
    assert "model tiny: 1.44M params on cpu (fp32); 2 steps" in done.stderr
