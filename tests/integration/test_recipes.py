"""Every task recipe validates and runs two CPU steps end to end (hub data swapped for local
files in the same schema; shared data skipped with a reason when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, shared_path
from tunesmith.cli.main import run
from tunesmith.config import load_config

RECIPES = ["llama_sft_alpaca", "llama2_dolly_openqa", "llama_samsum_summarization", "gptj_clm_wikitext",
           "gpt2_clm_wikitext", "roberta_mlm_wikitext", "llama3_quotes", "llama_dpo_lora"]
QUICK = ["train.max_steps=2", "schedule.warmup_steps=0", "train.micro_batch_size=2",
         "train.precision=fp32", "eval.max_batches=1", "logging.progress=false",
         "output.save_final=false"]


def _local_data(name: str, tmp_path: Path) -> list[str]:
    """Overrides that replace hub data sets by small local files in their schema."""
    if name == "llama2_dolly_openqa":
        rows = [{"instruction": f"Question {i}?", "context": "", "response": f"Answer {i}.",
                 "category": "open_qa" if i % 2 else "brainstorming"} for i in range(120)]
    elif name == "llama_samsum_summarization":
        rows = [{"id": str(i), "dialogue": f"Ann: Lunch at {i}?\r\nBob: Sure.",
                 "summary": f"Ann and Bob have lunch at {i}."} for i in range(24)]
    else:
        return []
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"data.path={path}"]


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_on_cpu(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared_path("tokenizers")  # recipes point into ../shared/data
    monkeypatch.chdir(tmp_path)  # recipe paths are relative to the recipe: any cwd works
    recipe = REPO / "recipes" / f"{name}.yaml"
    extra = _local_data(name, tmp_path) + [f"output.dir={tmp_path / 'out'}"]
    if name == "roberta_mlm_wikitext":
        from tunesmith.data.roberta_tokenizer import build

        build(shared_path("tokenizers", "gpt2", "hf"), tmp_path / "rtok")
        extra.append(f"model.tokenizer={tmp_path / 'rtok'}")
    cfg = load_config(recipe, QUICK + extra)
    if cfg.eval.generate.enabled:
        extra += ["eval.generate.max_samples=1", "eval.generate.max_new_tokens=4"]
    assert run(["train", str(recipe), *QUICK, *extra]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_loss"] > 0
    if cfg.eval.generate.enabled:
        assert summary["gen_samples"] == 1
