"""Config: YAML + overrides, strict keys with suggestions, types and impossible combinations."""

import pytest

from tunesmith.config import load_config
from tunesmith.config.loader import describe_options
from tunesmith.errors import TunesmithError


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_recipe_and_dotted_overrides(tmp_path):
    p = write(tmp_path, "data:\n  path: x.txt\n  block_size: 128\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(p, ["optim.lr=3e-4", "data.block_size=1024", "optim.betas=[0.9,0.99]"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.block_size == 1024
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.data.path == "x.txt"


def test_unknown_key_names_closest(tmp_path):
    p = write(tmp_path, "data:\n  path: x\noptim:\n  lrr: 1\n")
    with pytest.raises(TunesmithError, match=r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(p)
    with pytest.raises(TunesmithError, match=r"did you mean 'train'"):
        load_config(None, ["data.path=x", "trian.seed=1"])


def test_wrong_type_and_range():
    with pytest.raises(TunesmithError, match=r"train.micro_batch_size: .*integer.*'abc'"):
        load_config(None, ["data.path=x", "train.micro_batch_size=abc"])
    with pytest.raises(TunesmithError, match=r"data.block_size: .*greater than 0"):
        load_config(None, ["data.path=x", "data.block_size=0"])


def test_impossible_combinations():
    with pytest.raises(TunesmithError, match="data.path is required"):
        load_config(None, [])
    with pytest.raises(TunesmithError, match="pad_to_multiple_of only applies"):
        load_config(None, ["data.path=x", "data.pad_to_multiple_of=8"])
    with pytest.raises(TunesmithError, match="warmup_steps=50 exceeds train.max_steps=10"):
        load_config(None, ["data.path=x", "schedule.warmup_steps=50", "train.max_steps=10"])


def test_error_names_where_the_bad_value_came_from(tmp_path):
    """A bad override typed on the command line is not blamed on the recipe file; a
    whole-config check that an override took part in names both."""
    p = write(tmp_path, "data:\n  path: x\noptim:\n  lrr: 1\nschedule:\n  warmup_steps: 20\n")
    with pytest.raises(TunesmithError, match=r"^invalid config in \S*r\.yaml: unknown key 'optim.lrr'"):
        load_config(p, ["train.seed=3"])
    p.write_text("data:\n  path: x\nschedule:\n  warmup_steps: 20\n")
    with pytest.raises(TunesmithError, match=r"^invalid config in command-line override: "
                       r"optim.lr: .*'abc'"):
        load_config(p, ["optim.lr=abc"])
    with pytest.raises(TunesmithError, match=r"^invalid config in .*r\.yaml \+ command-line "
                       r"overrides: schedule.warmup_steps=20 exceeds train.max_steps=6"):
        load_config(p, ["train.max_steps=6"])
    with pytest.raises(TunesmithError, match=r"^invalid config in command line: optim.lr"):
        load_config(None, ["data.path=x", "optim.lr=abc"])


def test_invalid_yaml_reports_line_and_column(tmp_path):
    p = write(tmp_path, "model:\n  name: tiny\n data: [\n")
    with pytest.raises(TunesmithError, match=r"invalid YAML at .*r\.yaml:3:2"):
        load_config(p)


def test_missing_recipe_and_bad_override(tmp_path):
    with pytest.raises(TunesmithError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(TunesmithError, match="not of the form"):
        load_config(None, ["optim.lr"])


def test_help_lists_every_leaf_option():
    text = "\n".join(describe_options())
    for key in ("model.name", "data.block_size", "optim.lr", "schedule.warmup_ratio",
                "train.grad_accum_steps", "eval.every_steps", "logging.steps", "output.dir"):
        assert key in text


def test_docs_config_reference_is_current():
    from tests.conftest import REPO
    from tunesmith.config.loader import reference_markdown

    assert (REPO / "docs" / "config.md").read_text() == reference_markdown(), (
        "docs/config.md is stale: run `python -m tunesmith.config.loader > docs/config.md`"
    )
