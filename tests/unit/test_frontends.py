"""Front-end flag handling: the parser's syntax, errors naming the closest flag (exit 2), hub
names offline, accelerator-flag and llama-recipes mappings, and --print-recipe files that
`tunesmith train` reads back as the same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import shared_path
from tunesmith.cli.main import run
from tunesmith.errors import TunesmithError
from tunesmith.frontends.flags import Flag, FlagParser
from tunesmith.frontends.hf_scripts import build_recipe as build_hf
from tunesmith.frontends.llama_recipes import build_recipe as build_lr


def _parser() -> FlagParser:
    return FlagParser("tool", [Flag("bf16", bool, False), Flag("epochs", int, 3),
                               Flag("lr", float, 1e-4), Flag("targets", "list"),
                               Flag("mode", str, "a", choices=("a", "b")),
                               Flag("fast", bool, True), Flag("out", "opt")])


@pytest.mark.parametrize("argv, want", [
    (["--bf16"], True), (["--bf16", "True"], True), (["--bf16", "no"], False),
    (["--bf16=false"], False), (["--bf16", "--epochs", "2"], True),
])
def test_booleans_take_the_spellings_hf_and_fire_accept(argv, want) -> None:
    assert _parser().parse(argv)["bf16"] is want


def test_values_lists_negations_and_optional_values() -> None:
    f = _parser().parse(["--epochs", "3.0", "--lr=-1e-3", "--targets", "q_proj", "v_proj",
                         "--no_fast", "--mode", "b", "--out"])
    assert (f["epochs"], f["lr"], f["targets"], f["fast"], f["mode"], f["out"]) == (
        3, -1e-3, ["q_proj", "v_proj"], False, "b", True)
    assert f.order == ["epochs", "lr", "targets", "fast", "mode", "out"]
    assert _parser().parse(["--out", "r.yaml"])["out"] == "r.yaml"


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "2.5"], "--epochs: expected an integer, got '2.5'"),
    (["--mode", "c"], "--mode: 'c' is not one of a, b"),
    (["--bf16", "maybe"], None),  # not a boolean word: taken as a stray argument
    (["--lr"], "--lr: expected a value"),
    (["--epoch", "2"], "tool: unknown or unsupported flag --epoch (closest known flag: --epochs)"),
])
def test_bad_flags_are_one_clear_error(argv, message) -> None:
    with pytest.raises(TunesmithError) as e:
        _parser().parse(argv)
    if message:
        assert str(e.value) == message


@pytest.mark.parametrize("frontend, flag, closest", [
    ("run_clm", "--learning_rte", "--learning_rate"),
    ("run_mlm", "--line-by-lines", "--line-by-line"),
    ("run_lora_clm", "--lora_rnk", "--lora_rank"),
    ("llama-recipes", "--enable_fdsp", "--enable_fsdp"),
])
def test_unknown_flag_exits_2_naming_the_closest(frontend, flag, closest, capsys) -> None:
    assert run([frontend, flag, "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"unknown or unsupported flag {flag} (closest known flag: {closest})" in err


def test_help_lists_every_flag_with_its_key(capsys) -> None:
    assert run(["run_clm", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--per_device_train_batch_size int (default 8): -> train.micro_batch_size" in out
    assert "--spmd_2d_sharding" in out and "--use_habana" in out


def test_hub_data_set_offline_without_a_mirror_is_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("TUNESMITH_DATASETS", raising=False)
    model = shared_path("models", "stories260K", "hf")
    argv = ["--model_name_or_path", str(model), "--dataset_name", "wikitext",
            "--dataset_config_name", "wikitext-2-raw-v1", "--do_train", "--output_dir", "x"]
    assert run(["run_clm", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("tunesmith: error: --dataset_name wikitext (wikitext-2-raw-v1) is not available "
                   "offline: set TUNESMITH_DATASETS to a folder holding "
                   "text/wikitext-2/wiki.train.raw; or pass local files with "
                   "--train_file/--validation_file")
    assert run(["run_clm", *argv[:4], "--do_train", "--output_dir", "x"]) == 2
    assert "needs --dataset_config_name (one of wikitext-103-raw-v1, wikitext-103-v1, " \
           "wikitext-2-raw-v1, wikitext-2-v1)" in capsys.readouterr().err
    assert run(["run_clm", "--model_name_or_path", str(model), "--dataset_name", "nobody/nothing",
                "--do_train", "--output_dir", "x"]) == 2
    assert "nobody/nothing is not available offline: it has no local mirror entry" in \
        capsys.readouterr().err


def _stories_clm(*extra: str) -> list[str]:
    return ["--model_name_or_path", str(shared_path("models", "stories260K", "hf")),
            "--train_file", str(shared_path("text", "tinyshakespeare", "input.txt")),
            "--do_train", "--output_dir", "out", *extra]


def test_printed_recipe_file_is_what_tunesmith_train_runs(tmp_path, monkeypatch, capsys) -> None:
    from tunesmith.config import load_config

    monkeypatch.chdir(tmp_path)
    argv = _stories_clm("--learning_rate", "3e-4", "--warmup_ratio", "0.1", "--bf16",
                        "--save_strategy", "epoch", "--gradient_checkpointing", "--optim",
                        "adamw_torch_fused", "--max_grad_norm", "0")
    assert run(["run_clm", *argv, "--print-recipe", "recipe.yaml"]) == 0
    recipe, _ = build_hf("run_clm", argv)
    assert load_config(tmp_path / "recipe.yaml") == recipe.config()
    data = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert data["schedule"] == {"name": "linear", "warmup_ratio": 0.1}
    assert data["checkpoint"] == {"every_epoch": True, "keep_last": None}
    assert data["optim"]["fused"] is True and data["train"]["max_grad_norm"] is None
    assert data["data"]["block_size"] == 512  # min(1024, stories260K's 512 positions)
    assert data["output"]["dir"] == str(tmp_path / "out")
    assert "recipe written to" in capsys.readouterr().err


@pytest.mark.parametrize("flags, parallel", [
    (["--spmd_fsdp_sharding"], {"strategy": "full_shard"}),
    (["--spmd_2d_sharding", "4"], {"strategy": "full_shard", "tp": 4}),
    (["--spmd_2d_sharding", "2", "--spmd_dcn_parallelism", "2", "--spmd_grad_chkpt"],
     {"strategy": "hybrid_shard", "tp": 2, "dp_replicate": 2, "activation_checkpointing": "full"}),
    (["--fsdp", "hybrid_shard auto_wrap offload"], {"strategy": "hybrid_shard",
                                                    "cpu_offload": True}),
])
def test_sharding_flags_map_to_the_parallel_section(flags, parallel) -> None:
    recipe, _ = build_hf("run_clm", _stories_clm(*flags))
    assert recipe.data["parallel"] == parallel
    recipe.config()  # valid


def test_exclusive_spmd_flags_and_unsupported_values_fail() -> None:
    with pytest.raises(TunesmithError, match="exclude each other"):
        build_hf("run_clm", _stories_clm("--spmd_fsdp_sharding", "--spmd_2d_sharding", "2"))
    with pytest.raises(TunesmithError, match="is not one of"):
        build_hf("run_clm", _stories_clm("--lr_scheduler_type", "polynomial"))
    with pytest.raises(TunesmithError, match="run_mlm needs an encoder"):
        build_hf("run_mlm", _stories_clm())
    with pytest.raises(TunesmithError, match="nothing to do"):
        build_hf("run_clm", [a for a in _stories_clm() if a != "--do_train"])


def _llama_recipes(*extra: str) -> list[str]:
    data = shared_path("instruct", "alpaca", "alpaca_data_first335.json")
    return ["--model_name", str(shared_path("models", "stories260K", "hf")), "--dataset",
            "alpaca_dataset", "--alpaca_dataset.data_path", str(data), "--output_dir", "out",
            *extra]


def test_llama_recipes_fsdp_fields_map_to_parallel_and_precision() -> None:
    recipe, _ = build_lr("llama-recipes", _llama_recipes(
        "--enable_fsdp", "--fsdp_config.sharding_strategy", "SHARD_GRAD_OP", "--pure_bf16",
        "--fsdp_cpu_offload", "--freeze_layers", "--num_freeze_layers", "2",
        "--gradient_clipping", "--gradient_clipping_threshold", "0.5", "--batching_strategy",
        "padding"))
    d = recipe.data
    assert d["parallel"] == {"strategy": "shard_grad_op", "activation_checkpointing": "full",
                             "cpu_offload": True}
    assert d["train"]["precision"] == "bf16-pure" and d["train"]["max_grad_norm"] == 0.5
    assert d["peft"] == {"num_freeze_layers": 2} and d["sft"]["packing"] is False
    assert {n.split(":")[0] for n in recipe.notes} >= {"--checkpoint_type"}
    recipe.config()


def test_llama_recipes_wandb_flop_counter_and_profiler_fields(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe, _ = build_lr("llama-recipes", _llama_recipes(
        "--use_wandb", "--wandb_config.project", "ft", "--entity", "team", "--tags", "a", "b",
        "--wandb_config.group", "g1", "--mode", "offline", "--save_metrics",
        "--flop_counter", "--flop_counter_start", "5", "--use_profiler", "--profiler_dir", "prof"))
    d = recipe.data
    assert d["logging"] == {"trackers": ["wandb"], "project": "ft", "entity": "team",
                            "tags": ["a", "b"],
                            "tracker_options": {"wandb": {"group": "g1", "mode": "offline"}}}
    # llama-recipes' profiler: schedule(wait=1, warmup=2, active=3) with shapes, stacks, memory.
    assert d["profile"] == {"count_flops": True, "flop_counter_start": 5, "wait": 1, "warmup": 2,
                            "active": 3, "record_shapes": True, "with_stack": True,
                            "profile_memory": True, "dir": str(tmp_path / "prof")}
    cfg = recipe.config()
    assert cfg.profile.window == (4, 6) and cfg.logging.trackers == ["wandb"]
    noted = {n.split(":")[0] for n in recipe.notes}
    assert {"--save_metrics", "--flop_counter", "--use_profiler"} <= noted

    # Defaults: W&B project llama_recipes as there; the placeholder profiler_dir means
    # OUTPUT/profile; wandb_config fields alone (no --use_wandb) are ignored, as there.
    recipe, _ = build_lr("llama-recipes", _llama_recipes("--use_wandb", "--use_profiler"))
    assert recipe.data["logging"] == {"trackers": ["wandb"], "project": "llama_recipes"}
    assert "dir" not in recipe.data["profile"]
    recipe, _ = build_lr("llama-recipes", _llama_recipes("--wandb_config.project", "x",
                                                         "--profiler_dir", "p"))
    assert "logging" not in recipe.data and "profile" not in recipe.data
    assert {n.split(":")[0] for n in recipe.notes} >= {"wandb_config", "--profiler_dir"}


def test_xla_profile_variables_map_to_profile_steps(monkeypatch, tmp_path) -> None:
    for var, value in {"PROFILE_EPOCH": "0", "PROFILE_STEP": "3", "PROFILE_DURATION_MS": "20000",
                       "PROFILE_LOGDIR": str(tmp_path / "xla")}.items():
        monkeypatch.setenv(var, value)
    recipe, _ = build_hf("run_clm", _stories_clm())
    assert recipe.data["profile"] == {"steps": [4, 6], "dir": str(tmp_path / "xla")}
    assert recipe.config().profile.window == (4, 6)
    assert {n.split(":")[0] for n in recipe.notes} >= {"PROFILE_STEP", "PROFILE_DURATION_MS"}
    monkeypatch.setenv("PROFILE_EPOCH", "1")
    with pytest.raises(TunesmithError, match="only epoch 0"):
        build_hf("run_clm", _stories_clm())
    monkeypatch.delenv("PROFILE_EPOCH")
    monkeypatch.delenv("PROFILE_STEP")
    recipe, _ = build_hf("run_clm", _stories_clm())
    assert "profile" not in recipe.data
    assert any(n.startswith("PROFILE_DURATION_MS, PROFILE_LOGDIR: nothing is traced") for n in recipe.notes)


def test_llama_recipes_lora_fields_and_refusals() -> None:
    recipe, _ = build_lr("llama-recipes", _llama_recipes(
        "--use_peft", "--lora_config.r", "16", "--lora_config.target_modules", "q_proj",
        "k_proj", "--use_fp16"))
    assert recipe.data["peft"] == {"method": "lora", "r": 16, "alpha": 32.0, "dropout": 0.05,
                                   "target_modules": ["q_proj", "k_proj"]}
    assert recipe.data["train"]["precision"] == "fp16"
    with pytest.raises(TunesmithError, match="--quantization needs --use_peft"):
        build_lr("llama-recipes", _llama_recipes("--quantization"))
    with pytest.raises(TunesmithError, match="tunesmith does not run dataset code"):
        build_lr("llama-recipes", _llama_recipes("--dataset", "custom_dataset",
                                                 "--custom_dataset.file", "ds.py:get_data"))


def test_llama_recipes_llama_adapter_maps_and_trains(tmp_path: Path) -> None:
    """--peft_method llama_adapter -> peft.method llama_adapter; a 2-step run on stories260K
    (5 blocks) writes peft's ADAPTION_PROMPT adapter."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i} plus {i}?", "a": f"It is {2 * i}."}) + "\n"
                            for i in range(24)))
    argv = _llama_recipes("--use_peft", "--peft_method", "llama_adapter",
                          "--llama_adapter_config.adapter_len", "4",
                          "--llama_adapter_config.adapter_layers", "2", "--enable_fsdp",
                          "--dataset", "custom_dataset", "--custom_dataset.file", str(data),
                          "--custom_dataset.format", "custom", "--custom_dataset.prompt_template",
                          "Q: {q}\nA: ", "--custom_dataset.response_template", "{a}")
    recipe, _ = build_lr("llama-recipes", argv)
    assert recipe.data["peft"] == {"method": "llama_adapter", "adapter_len": 4, "adapter_layers": 2}
    recipe.config()
    out = tmp_path / "out"
    assert run(["llama-recipes", *argv, "--max_train_step", "2", "--max_eval_step", "1",
                "--context_length", "128", "--batch_size_training", "2", "--output_dir", str(out)]) == 0
    conf = json.loads((out / "final" / "adapter_config.json").read_text())
    assert (conf["peft_type"], conf["adapter_len"], conf["adapter_layers"]) == ("ADAPTION_PROMPT", 4, 2)


def test_llama_recipes_alpaca_dataset_trains_on_the_real_file(tmp_path: Path, caplog) -> None:
    """The real Alpaca file has a record with an empty output (record 285): llama-recipes keeps
    it, so the front-end must not stop on it; it is skipped and counted, and the run trains."""
    out = tmp_path / "out"
    assert run(["llama-recipes", *_llama_recipes(), "--max_train_step", "1", "--max_eval_step",
                "1", "--context_length", "256", "--batch_size_training", "2", "--run_validation",
                "False", "--output_dir", str(out)]) == 0
    assert "record 285: empty response in field 'output'" in caplog.text
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_llama_recipes_custom_dataset_is_a_data_file(tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    data.write_text('{"q": "2+2?", "a": "4"}\n')
    recipe, _ = build_lr("llama-recipes", _llama_recipes(
        "--dataset", "custom_dataset", "--custom_dataset.file", str(data),
        "--custom_dataset.format", "custom", "--custom_dataset.prompt_template", "Q: {q}\nA: ",
        "--custom_dataset.response_template", "{a}"))
    assert recipe.data["sft"]["format"] == "custom"
    assert recipe.data["data"]["path"] == str(data)
    recipe.config()


def test_every_accepted_flag_is_in_docs_migrating() -> None:
    from tests.conftest import REPO
    from tunesmith.frontends.hf_scripts import parser as hf_parser
    from tunesmith.frontends.llama_recipes import parser as lr_parser

    doc = (REPO / "docs" / "migrating.md").read_text()
    missing = []
    for p in (hf_parser("run_clm"), hf_parser("run_mlm"), hf_parser("run_lora_clm"), lr_parser()):
        for name in p.table:
            short = name.split(".")[-1]
            if name not in ("print-recipe", "debug") and f"`--{name}" not in doc \
                    and f"`{name}" not in doc and f"`{short}" not in doc and f".{short}`" not in doc:
                missing.append(f"{p.prog} --{name}")
    assert not missing, missing
