"""Recipe paths resolve against the recipe's folder, override paths against the cwd, and the
resolved absolute paths are what the config (and OUTPUT/config.yaml) holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tunesmith.config import load_config
from tunesmith.config.loader import dump_config


def _recipe(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("hello\n")
    recipe = folder / "r.yaml"
    recipe.write_text(text)
    return recipe


def test_recipe_paths_are_relative_to_the_recipe(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path / "proj" / "cfg", "data: {path: train.txt, cache_dir: cache}\n"
                     "output: {dir: ../runs/a}\nmodel: {tokenizer: ./tok}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(recipe)
    folder = recipe.parent
    assert cfg.data.path == str(folder / "train.txt")
    assert cfg.data.cache_dir == str(folder / "cache")
    assert cfg.output.dir == str(tmp_path / "proj" / "runs" / "a")
    assert cfg.model.tokenizer == str(folder / "tok")  # spelled as a path: resolved, even if absent
    assert cfg.model.name == "tiny"  # a preset stays a preset


def test_override_paths_are_relative_to_the_cwd(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path / "cfg", "data: {path: train.txt}\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x\n")
    cfg = load_config(recipe, ["data.validation_path=mine.txt", "output.dir=out/b",
                               "checkpoint.resume=auto"])
    assert cfg.data.path == str(recipe.parent / "train.txt")
    assert cfg.data.validation_path == str(tmp_path / "mine.txt")
    assert cfg.output.dir == str(tmp_path / "out" / "b")
    assert cfg.checkpoint.resume == "auto"


def test_default_output_dir_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.path=some/hub-dataset"])
    assert cfg.output.dir == str(tmp_path / "outputs" / "run")
    assert cfg.data.path == "some/hub-dataset"  # not on disk, not spelled as a path: a hub name


def test_hub_ids_and_presets_are_kept(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path / "cfg", "model: {name: llama3.2-1b, tokenizer: meta-llama/Llama-3.2-1B}\n"
                     "data: {path: databricks/databricks-dolly-15k}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(recipe)
    assert (cfg.model.name, cfg.model.tokenizer, cfg.data.path) == (
        "llama3.2-1b", "meta-llama/Llama-3.2-1B", "databricks/databricks-dolly-15k")


def test_old_cwd_relative_recipe_still_works_with_a_warning(tmp_path, monkeypatch, caplog):
    repo = tmp_path / "repo"
    recipe = _recipe(repo / "recipes", "data: {path: ../shared/x.txt}\n")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "x.txt").write_text("x\n")
    monkeypatch.chdir(repo)
    cfg = load_config(recipe)
    assert cfg.data.path == str(tmp_path / "shared" / "x.txt")
    assert "relative to the recipe's folder" in caplog.text


def test_config_yaml_holds_absolute_paths(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path / "cfg", "data: {path: train.txt}\noutput: {dir: out}\n")
    monkeypatch.chdir(tmp_path.parent)
    dump_config(load_config(recipe), tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["data"]["path"] == str(recipe.parent / "train.txt")
    assert saved["output"]["dir"] == str(recipe.parent / "out")


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_resolve_from_any_cwd(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(recipe)
    for value in (cfg.model.name, cfg.model.tokenizer, cfg.data.path, cfg.data.validation_path):
        if value and ("shared" in value or value.endswith(".jsonl")):
            assert Path(value).is_absolute(), value
            if (REPO.parent / "shared").exists():
                assert Path(value).exists(), value
    assert Path(cfg.output.dir).is_relative_to(REPO / "outputs")
