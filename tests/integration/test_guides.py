"""Every command line of the guides in ../shared/seeds that trains or evaluates, run through its
front-end: the recipe it prints equals a hand-written expectation, and the run itself (hub ids
swapped for tiny local models, two steps on CPU) finishes with a finite loss."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import yaml

from tests.guides import (
    GUIDE_HABANA,
    GUIDE_LLAMA_RECIPES,
    GUIDE_XLA,
    World,
    build_world,
    guide_commands,
    localize,
)
from tunesmith.cli.main import run

pytestmark = pytest.mark.slow

# (case id, guide, script in the guide, occurrence, tunesmith front-end)
CASES = [
    ("clm-gpt2-wikitext", GUIDE_HABANA, "run_clm.py", 0, "run_clm"),
    ("clm-gpt2-own-files", GUIDE_HABANA, "run_clm.py", 1, "run_clm"),
    ("clm-gpt2-multicard", GUIDE_HABANA, "run_clm.py", 2, "run_clm"),
    ("clm-gptj-zero2", GUIDE_HABANA, "run_clm.py", 3, "run_clm"),
    ("clm-neox-zero2", GUIDE_HABANA, "run_clm.py", 4, "run_clm"),
    ("clm-gpt2-pretrain", GUIDE_HABANA, "run_clm.py", 5, "run_clm"),
    ("clm-gpt2xl-deepspeed", GUIDE_HABANA, "run_clm.py", 6, "run_clm"),
    ("clm-gpt2-inference", GUIDE_HABANA, "run_clm.py", 7, "run_clm"),
    ("clm-gpt2-streaming", GUIDE_HABANA, "run_clm.py", 8, "run_clm"),
    ("clm-gpt2-on-the-fly", GUIDE_HABANA, "run_clm.py", 9, "run_clm"),
    ("mlm-roberta-wikitext", GUIDE_HABANA, "run_mlm.py", 0, "run_mlm"),
    ("mlm-roberta-own-files", GUIDE_HABANA, "run_mlm.py", 1, "run_mlm"),
    ("mlm-roberta-multicard", GUIDE_HABANA, "run_mlm.py", 2, "run_mlm"),
    ("lora-llama-alpaca", GUIDE_HABANA, "run_lora_clm.py", 0, "run_lora_clm"),
    ("lora-llama-alpaca-multicard", GUIDE_HABANA, "run_lora_clm.py", 1, "run_lora_clm"),
    ("xla-llama2-pretrain", GUIDE_XLA, "run_clm.py", 0, "run_clm"),
    ("xla-llama2-docker", GUIDE_XLA, "run_clm.py", 1, "run_clm"),
    ("llama-recipes-qlora-wandb", GUIDE_LLAMA_RECIPES, "llama_recipes.finetuning", 0,
     "llama-recipes"),
]
# The XLA guide's environment (its "Setup envs" block).
XLA_ENV = {"PJRT_DEVICE": "TPU", "XLA_USE_BF16": "1", "XLA_IR_DEBUG": "1", "XLA_HLO_DEBUG": "1",
           "PROFILE_EPOCH": "0", "PROFILE_STEP": "3", "PROFILE_DURATION_MS": "20000",
           "PROFILE_LOGDIR": "/tmp/home/"}
# Those with a note; PROFILE_EPOCH=0 and PROFILE_LOGDIR map silently (profile.steps, profile.dir).
XLA_NOTES = set(XLA_ENV) - {"PROFILE_EPOCH", "PROFILE_LOGDIR"}
HABANA_NOTES = {"--use_habana", "--use_lazy_mode", "--gaudi_config_name",
                "--use_hpu_graphs_for_inference"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("guides"))


@pytest.fixture
def guide_env(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.setenv("TUNESMITH_DATASETS", str(world.mirror))
    return world


def _merge(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is _DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


_DROP = object()

# What TrainingArguments' defaults are, written as tunesmith keys.
HF_DEFAULTS = {
    "optim": {"name": "adamw", "lr": 5e-05, "weight_decay": 0.0, "betas": [0.9, 0.999],
              "eps": 1e-08},
    "schedule": {"name": "linear", "warmup_steps": 0},
    "train": {"seed": 42, "precision": "fp32", "micro_batch_size": 8, "grad_accum_steps": 1,
              "epochs": 3, "max_grad_norm": 1.0},
    "eval": {"at_end": False, "batch_size": 8},
    "logging": {"steps": 500},
    "checkpoint": {"every_steps": 500, "keep_last": None},
}


def _wikitext(w: World) -> dict:
    wiki = w.mirror / "text" / "wikitext-2"
    return {"path": str(wiki / "wiki.train.raw"), "validation_path": str(wiki / "wiki.valid.raw")}


def _own_files() -> dict:
    from tests.conftest import shared_path

    return {"path": str(shared_path("text", "wikitext-2", "wiki.test.raw")),
            "validation_path": str(shared_path("text", "wikitext-2", "wiki.valid.raw"))}


def _clm(w: World, name: Path | str, batch: int, out: str, data: dict | None = None,
         **changes) -> dict:
    """A Habana-guide run_clm recipe: GPT-2-sized blocks, 3 epochs, warm-up 3 for throughput."""
    base = _merge(HF_DEFAULTS, {
        "task": "clm", "model": {"name": str(name)},
        "data": {**(data or _wikitext(w)), "block_size": 1024, "drop_last": False},
        "train": {"micro_batch_size": batch, "throughput_warmup_steps": 3},
        "eval": {"at_end": True, "batch_size": batch}, "output": {"dir": out}})
    return _merge(base, changes)


def _mlm(w: World, data: dict | None = None) -> dict:
    return _merge(HF_DEFAULTS, {
        "task": "mlm", "model": {"name": str(w.roberta)},
        # min(1024, positions of the stand-in RoBERTa) = 256 (roberta-base: 512)
        "data": {**(data or _wikitext(w)), "block_size": 256, "drop_last": False},
        "mlm": {"probability": 0.15}, "train": {"throughput_warmup_steps": 3},
        "eval": {"at_end": True}, "output": {"dir": "/tmp/test-mlm"}})


def _lora(w: World) -> dict:
    from tests.conftest import shared_path

    return _merge(HF_DEFAULTS, {
        "task": "sft", "model": {"name": str(shared_path("models", "stories260K", "hf"))},
        "data": {"path": str(w.mirror / "instruct" / "alpaca" / "alpaca_data.json"),
                 "block_size": 512, "validation_split_percentage": 0, "drop_last": False},
        "sft": {"format": "alpaca", "train_on_inputs": True, "packing": True, "invalid": "skip"},
        "optim": {"lr": 1e-4},
        "train": {"precision": "bf16", "micro_batch_size": 2, "grad_accum_steps": 4,
                  "throughput_warmup_steps": 3},
        "eval": {"batch_size": 2}, "logging": {"steps": 1},
        "output": {"dir": str(Path("model_lora_llama").absolute())},
        "checkpoint": {"every_steps": 2000, "keep_last": 1},
        "peft": {"method": "lora", "r": 8, "alpha": 16.0, "dropout": 0.05,
                 "target_modules": ["q_proj", "v_proj"]}})


def _xla(w: World, epochs: int, tp: int | None) -> dict:
    from tests.conftest import shared_path

    parallel = {"strategy": "full_shard", "activation_checkpointing": "full"}
    if tp:
        parallel["tp"] = tp
    return _merge(HF_DEFAULTS, {
        "task": "clm", "model": {"name": str(w.llama_config), "from_scratch": True,
                                 "tokenizer": str(shared_path("tokenizers", "llama2", "hf"))},
        "data": {**_wikitext(w), "block_size": 1024, "drop_last": True},
        "optim": {"name": "adafactor", "betas": _DROP, "eps": _DROP},
        "train": {"precision": "bf16-pure", "micro_batch_size": 256, "epochs": epochs},
        "output": {"dir": "/tmp/output", "overwrite": True}, "checkpoint": _DROP,
        "parallel": parallel,
        # PROFILE_STEP=3 (XLA's 0-based step) -> steps 4-6; PROFILE_LOGDIR -> profile.dir.
        "profile": {"steps": [4, 6], "dir": "/tmp/home"}})


def expected(case: str, w: World) -> tuple[dict, set[str]]:
    """The hand-written recipe and the flags (or variables) that get a note."""
    ds = str(w.deepspeed)
    cache = {"--use_cache"}
    table: dict[str, tuple[dict, set[str]]] = {
        "clm-gpt2-wikitext": (_clm(w, w.gpt2, 4, "/tmp/test-clm"), HABANA_NOTES),
        "clm-gpt2-own-files": (_clm(w, w.gpt2, 8, "/tmp/test-clm", _own_files()), HABANA_NOTES),
        "clm-gpt2-multicard": (_clm(w, w.gpt2, 4, "/tmp/test-clm", parallel={
            "activation_checkpointing": "full"}), HABANA_NOTES | cache),
        "clm-gptj-zero2": (_clm(w, w.gptj, 4, "/tmp/test-clm-xl-1", parallel={
            "activation_checkpointing": "full", "deepspeed_config": ds}), HABANA_NOTES),
        "clm-neox-zero2": (_clm(w, w.neox, 2, "/tmp/test-clm-xl-bs2", parallel={
            "activation_checkpointing": "full", "deepspeed_config": ds}), HABANA_NOTES),
        "clm-gpt2-pretrain": (_clm(w, w.gpt2, 4, "/tmp/test-clm", model={
            "from_scratch": True, "tokenizer": str(w.gpt2)}), HABANA_NOTES),
        "clm-gpt2xl-deepspeed": (_clm(w, w.gpt2, 16, "/tmp/test-clm", optim={"lr": 4e-4},
                                      eval={"batch_size": 4}, parallel={
            "activation_checkpointing": "full", "deepspeed_config": ds}), HABANA_NOTES | cache),
        "clm-gpt2-streaming": (_clm(w, w.gpt2, 4, "/tmp/test-clm", data={
            **_wikitext(w), "streaming": True}, train={"max_steps": 1000}), HABANA_NOTES),
        "clm-gpt2-on-the-fly": (_clm(w, "gpt2", 2, "/tmp/test-clm", model={
            "from_scratch": True, "tokenizer": str(w.gpt2), "overrides": {
                "n_embd": 1024, "n_head": 16, "n_layer": 48, "n_positions": 1024}},
            parallel={"activation_checkpointing": "full"}), HABANA_NOTES | cache),
        "mlm-roberta-wikitext": (_mlm(w), HABANA_NOTES),
        "mlm-roberta-own-files": (_mlm(w, _own_files()), HABANA_NOTES),
        "mlm-roberta-multicard": (_mlm(w), HABANA_NOTES),
        "lora-llama-alpaca": (_lora(w), {"run_lora_clm", "--use_habana", "--use_lazy_mode"}),
        "lora-llama-alpaca-multicard": (_lora(w), {"run_lora_clm", "--use_habana",
                                                   "--use_lazy_mode"}),
        "xla-llama2-pretrain": (_xla(w, 1, None), XLA_NOTES | {
            "--torch_dtype", "--logging_strategy", "--spmd_2d_sharding",
            "--remove_unused_columns"}),
        "xla-llama2-docker": (_xla(w, 3, 2), XLA_NOTES | {
            "--torch_dtype", "--logging_strategy", "--spmd_2d_sharding", "--spmd_defer_init",
            "--remove_unused_columns"}),
    }
    return table[case]


def _llama_recipes(w: World) -> dict:
    samsum = w.mirror / "instruct" / "samsum"
    return {
        "task": "sft", "model": {"name": str(w.llama_qlora)},
        "data": {"path": str(samsum / "train.json"), "validation_path": str(samsum / "validation.json"),
                 "block_size": 4096},
        "sft": {"format": "summarization", "packing": True},
        "optim": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999]},
        "schedule": {"name": "step", "gamma": 0.85},
        "train": {"seed": 42, "precision": "bf16", "micro_batch_size": 4, "grad_accum_steps": 1,
                  "epochs": 3, "max_grad_norm": None},
        "eval": {"at_end": True, "batch_size": 1},
        "logging": {"trackers": ["wandb"], "project": "llama_recipes"},  # --use_wandb
        "output": {"dir": str(Path("Path/to/save/PEFT/model").absolute()), "save_final": True},
        "peft": {"method": "qlora", "r": 8, "alpha": 32.0, "dropout": 0.05,
                 "target_modules": ["q_proj", "v_proj"]},
    }


def _argv(case, w: World, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    name, guide, script, index, frontend = case
    commands = guide_commands(guide, script)
    assert len(commands) > index, f"{guide} has fewer {script} commands than expected"
    if guide == GUIDE_XLA:
        for var, value in XLA_ENV.items():
            monkeypatch.setenv(var, value)
    return frontend, localize(commands[index], w)


def _printed(frontend: str, argv: list[str], capsys) -> tuple[str, int]:
    capsys.readouterr()
    code = run([frontend, *argv, "--print-recipe"])
    return capsys.readouterr().out, code


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_guide_recipe_matches_expectation(case, guide_env: World, monkeypatch, capsys) -> None:
    monkeypatch.chdir(guide_env.root.parent)  # relative output dirs resolve here
    frontend, argv = _argv(case, guide_env, monkeypatch)
    out, code = _printed(frontend, argv, capsys)
    assert code == 0
    notes = {line.removeprefix("# note: ").split(":", 1)[0] for line in out.splitlines()
             if line.startswith("# note: ")}
    if case[0] == "clm-gpt2-inference":  # --do_eval alone: the tunesmith eval command
        assert out.splitlines()[-1] == (
            f"tunesmith eval {guide_env.gpt2} --data {_wikitext(guide_env)['validation_path']} "
            "--batch-size 4 --precision fp32 --device auto --block-size 1024")
        assert notes == HABANA_NOTES
        return
    if frontend == "llama-recipes":
        want, want_notes = _llama_recipes(guide_env), {
            "--batching_strategy", "--run_validation", "--quantization"}
    else:
        want, want_notes = expected(case[0], guide_env)
    assert yaml.safe_load(out) == want
    assert notes == want_notes


# Step-limiting flags appended to each command for a CPU run (later flags win, as in argparse).
def _quick(frontend: str, out_dir: Path) -> list[str]:
    if frontend == "llama-recipes":
        return ["--max_train_step", "2", "--max_eval_step", "1", "--context_length", "128",
                "--batch_size_training", "2", "--output_dir", str(out_dir)]
    quick = ["--max_steps", "2", "--max_train_samples", "8", "--max_eval_samples", "2",
             "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
             "--output_dir", str(out_dir), "--save_strategy", "no", "--logging_steps", "1"]
    size = {"run_clm": "--block_size", "run_mlm": "--max_seq_length",
            "run_lora_clm": "--max_seq_length"}[frontend]
    return [*quick, size, "64"]


# Multi-card commands whose recipe equals the single-card one (checked above) are not re-run.
RUNS = [c for c in CASES if c[0] not in ("mlm-roberta-multicard", "lora-llama-alpaca-multicard")]


def test_multicard_commands_build_the_single_card_recipe(guide_env: World, monkeypatch,
                                                         capsys) -> None:
    for single, multi in (("mlm-roberta-wikitext", "mlm-roberta-multicard"),
                          ("lora-llama-alpaca", "lora-llama-alpaca-multicard")):
        printed = [_printed(*_argv(next(c for c in CASES if c[0] == name), guide_env,
                                   monkeypatch), capsys)[0] for name in (single, multi)]
        assert [yaml.safe_load(p) for p in printed][0] == yaml.safe_load(printed[1])


@pytest.mark.parametrize("case", RUNS, ids=[c[0] for c in RUNS])
def test_guide_command_runs(case, guide_env: World, monkeypatch, tmp_path, capsys) -> None:
    frontend, argv = _argv(case, guide_env, monkeypatch)
    if case[0] == "xla-llama2-docker":  # --spmd_2d_sharding 2 is TP 2: two ranks at least
        assert run([frontend, *argv, *_quick(frontend, tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == "tunesmith: error: parallel.tp=2 does not divide the world size 1"
        return
    if frontend == "llama-recipes":  # --use_wandb: W&B offline, its files under tmp_path
        pytest.importorskip("wandb", reason="--use_wandb needs tunesmith[wandb]")
        for var, sub in (("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                         ("WANDB_DATA_DIR", "wandb-data")):
            monkeypatch.setenv(var, str(tmp_path / sub))
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    if case[0] == "clm-gpt2-on-the-fly":  # the 48-layer, 1024-wide shape is not for a CPU test
        i = argv.index(next(a for a in argv if a.startswith("--config_overrides")))
        argv[i] = "--config_overrides=n_embd=64,n_head=4,n_layer=2,n_positions=1024"
    capsys.readouterr()
    assert run([frontend, *argv, *_quick(frontend, tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    if case[0] == "clm-gpt2-inference":
        result = json.loads(out.strip().splitlines()[-1])
        assert math.isfinite(result["perplexity"]) and result["blocks"] > 0
        return
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert math.isfinite(summary["train_loss"]) and summary["train_loss"] > 0
    assert (tmp_path / "out" / "final").is_dir()
    if frontend == "llama-recipes":
        assert list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
