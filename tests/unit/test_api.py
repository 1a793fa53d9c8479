"""The notebook API: tunesmith.train / build_config / load_model / load_tokenizer /
Trainer.from_config, typed errors instead of exits, and a light `import tunesmith`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import tunesmith
from tests.conftest import REPO, shared_path
from tunesmith.errors import ConfigError, TunesmithError


def _recipe(out) -> dict:
    return {"model": {"name": str(shared_path("models", "stories260K", "hf"))},
            "data": {"path": str(shared_path("text", "tinyshakespeare", "input.txt")),
                     "block_size": 64, "max_train_samples": 32},
            "train": {"micro_batch_size": 4, "precision": "fp32", "max_steps": 2},
            "eval": {"max_batches": 1}, "logging": {"progress": False},
            "output": {"dir": str(out)}}


def test_import_is_light_and_names_resolve_lazily() -> None:
    code = ("import sys, tunesmith; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(sorted(n for n in tunesmith.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO / "src")}, check=True).stdout
    assert "train" in out and "load_model" in out
    assert tunesmith.errors.ConfigError is ConfigError
    assert callable(tunesmith.train) and tunesmith.Trainer.__name__ == "Trainer"


def test_build_config_merges_sections_and_dotted_keys(tmp_path) -> None:
    cfg = tunesmith.build_config(_recipe(tmp_path), optim={"lr": 1e-2}, train__max_steps=5,
                                 **{"schedule.warmup_steps": 1})
    assert (cfg.optim.lr, cfg.train.max_steps, cfg.train.micro_batch_size,
            cfg.schedule.warmup_steps) == (1e-2, 5, 4, 1)
    assert tunesmith.build_config(cfg, train__seed=7).train.seed == 7


def test_bad_input_raises_typed_errors_instead_of_exiting(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"in keyword override: unknown key 'optim.lrr' "
                       r"\(did you mean 'optim.lr'\?\)"):
        tunesmith.train(_recipe(tmp_path), optim={"lrr": 1.0})
    with pytest.raises(ConfigError, match=r"in keyword override: optim.lr: .*'abc'"):
        tunesmith.build_config(_recipe(tmp_path), optim__lr="abc")
    with pytest.raises(ConfigError, match="recipe must be a YAML path, a dict or a RunConfig"):
        tunesmith.build_config(42)
    with pytest.raises(TunesmithError, match="recipe not found"):
        tunesmith.train(tmp_path / "missing.yaml")
    with pytest.raises(TunesmithError, match="no such file or directory"):
        tunesmith.train(_recipe(tmp_path), data={"path": str(tmp_path / "none.txt")})


def test_train_returns_the_summary_it_writes(tmp_path) -> None:
    summary = tunesmith.train(_recipe(tmp_path / "run"))
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"])
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_load_model_matches_transformers_logits() -> None:
    from transformers import AutoModelForCausalLM

    path = shared_path("models", "stories260K", "hf")
    tok = tunesmith.load_tokenizer(path)
    ids = torch.tensor([tok("Once upon a time, there was a little girl")["input_ids"]])
    ours = tunesmith.load_model(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert not ours.training


def test_load_model_random_from_a_preset_and_overrides() -> None:
    model = tunesmith.load_model("tiny", overrides={"n_layers": 1, "dim": 32, "n_heads": 2,
                                                    "n_kv_heads": 2, "vocab_size": 64})
    assert model.cfg.n_layers == 1 and model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 64)
    with pytest.raises(TunesmithError, match="overrides change the shape"):
        tunesmith.load_model(shared_path("models", "stories260K", "hf"), overrides={"n_layers": 1})


def test_trainer_from_config_is_ready_to_train(tmp_path) -> None:
    trainer = tunesmith.Trainer.from_config(_recipe(tmp_path / "t"), train={"max_steps": 1})
    assert trainer.total_steps == 1 and len(trainer.bundle.tokenizer) == 512
    assert trainer.train()["steps"] == 1
