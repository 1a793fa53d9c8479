"""Layout validation (before any process group), DeepSpeed config import, launcher arguments."""

from __future__ import annotations

import json
import logging
import time

import pytest

from tests.distributed.helpers import job, torchrun
from tunesmith.cli.main import run
from tunesmith.config import load_config
from tunesmith.config.schema import ParallelConfig
from tunesmith.errors import TunesmithError
from tunesmith.models import resolve_model_config
from tunesmith.config.deepspeed import apply_deepspeed, map_deepspeed
from tunesmith.parallel.layout import check_run, resolve_layout


def layout(world: int, local: int | None = None, **kw):
    return resolve_layout(ParallelConfig(**kw), world, local)


# ----------------------------------------------------------------------------- degrees
def test_strategies_resolve_degrees():
    assert layout(8).mesh_shape == (1, 8, 1) and layout(8).strategy == "full_shard"
    assert layout(8, tp=2).mesh_shape == (1, 4, 2)
    assert layout(8, strategy="no_shard").mesh_shape == (8, 1, 1)
    assert layout(16, 8, strategy="hybrid_shard").mesh_shape == (2, 8, 1)  # shard in node
    assert layout(16, 8, strategy="hybrid_shard", tp=2).mesh_shape == (2, 4, 2)
    assert layout(8, dp_replicate=2).strategy == "hybrid_shard"
    assert layout(8, strategy="hybrid_shard", dp_shard=1, tp=2).mesh_shape == (4, 1, 2)
    assert layout(1).dp == 1


@pytest.mark.parametrize("world, local, kw, message", [
    (8, None, {"dp_shard": 3}, "dp_replicate=1 x dp_shard=3 x tp=1 = 3 do not match the world size 8"),
    (6, None, {"tp": 4}, "parallel.tp=4 does not divide the world size 6"),
    (16, 8, {"tp": 16}, "does not divide the 8 ranks per node"),
    (8, None, {"strategy": "full_shard", "dp_replicate": 2}, "needs strategy=hybrid_shard"),
    (8, None, {"strategy": "no_shard", "dp_shard": 2}, "no_shard replicates every parameter"),
    (8, None, {"strategy": "no_shard", "tp": 2}, "cannot be combined with tp > 1"),
    (8, None, {"strategy": "no_shard", "cpu_offload": True}, "cpu_offload needs a sharded strategy"),
    (8, None, {"dp_replicate": 3}, "cannot fill parallel.dp_shard"),
])
def test_bad_degrees_are_one_clear_line(world, local, kw, message):
    with pytest.raises(TunesmithError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        layout(world, local, **kw)
    assert "\n" not in str(e.value)


def test_zero_degree_rejected_by_config():
    with pytest.raises(TunesmithError, match="parallel.dp_shard: must be a positive degree or -1"):
        load_config(None, ["data.path=x", "parallel.dp_shard=0"])


def _tiny(**over):
    return resolve_model_config("tiny", {"n_heads": 4, "n_kv_heads": 2, "intermediate_size": 128, **over})[1]


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=4"], "must divide the model's n_kv_heads=2"),
    (["parallel.tp=8"], "must divide the model's n_heads=4"),
    (["parallel.tp=2", "data.block_size=63"], "data.block_size=63 must be a multiple of 2"),
    (["parallel.tp=2", "data.mode=lines"], "data.pad_to_multiple_of (lines mode)=None"),
])
def test_tp_must_fit_the_model_and_sequence(overrides, message):
    cfg = load_config(None, ["data.path=x", *overrides])
    lay = resolve_layout(cfg.parallel, 8)
    with pytest.raises(TunesmithError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_run(cfg, lay, _tiny(), "cpu")


def test_launch_rejects_bad_layout_before_starting_workers(monkeypatch, capsys):
    import torch.distributed.run as trun

    monkeypatch.setattr(trun, "run", lambda *a, **k: pytest.fail("torchrun must not start"))
    start = time.monotonic()
    code = run(["launch", "--nproc-per-node", "3", "data.path=x", "parallel.tp=2"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 10
    assert err.strip() == "tunesmith: error: parallel.tp=2 does not divide the world size 3"


def test_workers_exit_2_before_process_group(tiny_tokenizer_dir, demo_text, tmp_path):
    """Plain torchrun: every rank rejects the layout before init_process_group; rank 0 speaks."""
    train, valid = demo_text
    argv = ["-m", "tunesmith", "train", *job(tiny_tokenizer_dir, train, valid, tmp_path / "r",
                                             extra=("parallel.tp=4",))]
    proc = torchrun(2, argv, timeout=120)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("tunesmith: error")]
    assert lines == ["tunesmith: error (rank 0): parallel.tp=4 does not divide the world size 2"], proc.stderr[-2000:]
    assert "exitcode  : 2" in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing written


# ----------------------------------------------------------------------------- DeepSpeed
def test_deepspeed_stages_and_offload_map_to_strategies():
    assert map_deepspeed({"zero_optimization": {"stage": 0}}).updates == {"parallel.strategy": "no_shard"}
    for stage in (1, 2):
        assert map_deepspeed({"zero_optimization": {"stage": stage}}).updates["parallel.strategy"] == "shard_grad_op"
    m = map_deepspeed({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                             "offload_optimizer": {"device": "cpu"},
                                             "overlap_comm": True, "stage3_prefetch_bucket_size": 5e8}})
    assert m.updates == {"parallel.strategy": "full_shard", "parallel.cpu_offload": True}
    assert "zero_optimization.overlap_comm (no counterpart)" in m.ignored


def test_deepspeed_hf_style_config_imports(tmp_path, caplog):
    ds = {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto",
        "gradient_clipping": 0.5, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.99], "eps": "auto",
                                                  "weight_decay": 0.1, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR"}, "wall_clock_breakdown": False,
        "zero_optimization": {"stage": 3},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = load_config(None, ["data.path=x", f"parallel.deepspeed_config={path}", "optim.lr=1e-3"])
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        new = apply_deepspeed(cfg)
    assert new.parallel.strategy == "full_shard"
    assert new.train.micro_batch_size == 4 and new.train.max_grad_norm == 0.5
    assert new.train.precision == "bf16" and new.optim.betas == (0.9, 0.99)
    assert new.optim.weight_decay == pytest.approx(0.1)
    assert new.optim.lr == pytest.approx(1e-3)  # set explicitly in the recipe: kept
    assert new.train.grad_accum_steps == cfg.train.grad_accum_steps  # "auto": left alone
    text = caplog.text
    assert "zero_optimization.stage=3 -> parallel.strategy=full_shard" in text
    assert "kept from the recipe (explicitly set): optim.lr=0.001" in text
    assert "scheduler" in text and "optimizer.params.torch_adam" in text


@pytest.mark.parametrize("ds, message", [
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "nvme has no PyTorch-native"),
    ({"fp16": {"enabled": True}}, "fp16 loss scaling is not supported"),
    ({"pipeline": {"stages": 2}}, "'pipeline' (pipeline parallelism) is not supported"),
    ({"zero_optimization": {"stage": 4}}, "stage=4 is not 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "offload needs ZeRO stage >= 1"),
])
def test_deepspeed_unsupported_features_are_refused(ds, message):
    with pytest.raises(TunesmithError, match=message.replace("(", r"\(").replace(")", r"\)")):
        map_deepspeed(ds)


def test_deepspeed_missing_file_is_one_line(tmp_path, capsys):
    code = run(["train", "data.path=x", f"parallel.deepspeed_config={tmp_path / 'nope.json'}"])
    assert code == 2
    assert "parallel.deepspeed_config:" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["peft.method=qlora"], "peft.method=qlora (NF4 base) run on one process only"),
    (["peft.method=lora", "peft.save_merged=true"], "peft.save_merged (merge the saved adapter"),
    (["data.streaming=true", "train.max_steps=5"], "data.streaming run on one process only"),
])
def test_single_process_features_refused_across_ranks(overrides, message):
    cfg = load_config(None, ["data.path=x", *overrides])
    with pytest.raises(TunesmithError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_run(cfg, resolve_layout(cfg.parallel, 2), _tiny(), "cpu")
    check_run(cfg, resolve_layout(cfg.parallel, 1), _tiny(), "cpu")  # one process: fine


@pytest.mark.parametrize("overrides", [["peft.method=lora"], ["peft.num_freeze_layers=1"]])
def test_peft_composes_with_data_parallel_but_not_tp(overrides):
    cfg = load_config(None, ["data.path=x", *overrides])
    check_run(cfg, resolve_layout(cfg.parallel, 2), _tiny(), "cpu")  # FSDP2 over 2 ranks: fine
    tp = load_config(None, ["data.path=x", "parallel.tp=2", *overrides])
    with pytest.raises(TunesmithError, match="not yet with tensor parallelism"):
        check_run(tp, resolve_layout(tp.parallel, 2), _tiny(), "cpu")


def test_tp_needs_a_family_with_a_plan():
    cfg = load_config(None, ["data.path=x", "parallel.tp=2"])
    gpt2 = resolve_model_config("gpt2-tiny")[1]
    with pytest.raises(TunesmithError, match="plan for the Llama family only"):
        check_run(cfg, resolve_layout(cfg.parallel, 2), gpt2, "cpu")
    check_run(load_config(None, ["data.path=x"]), resolve_layout(ParallelConfig(), 2), gpt2, "cpu")


def test_launch_builds_torchrun_arguments():
    import argparse

    from tunesmith.parallel.launch import add_launch_args, torchrun_argv

    p = argparse.ArgumentParser()
    add_launch_args(p)
    one = torchrun_argv(p.parse_args(["--nproc-per-node", "8", "r.yaml"]), "tunesmith", ["train", "r.yaml"])
    assert "--standalone" in one and one[-4:] == ["-m", "tunesmith", "train", "r.yaml"]
    multi = torchrun_argv(p.parse_args(["--nnodes", "4", "--nproc-per-node", "8", "--rdzv-endpoint",
                                        "node0:29500", "--rdzv-id", "42", "r.yaml"]), "tunesmith", ["train"])
    joined = " ".join(multi)
    assert "--standalone" not in multi and "--nnodes 4" in joined
    assert "--rdzv-endpoint node0:29500" in joined and "--rdzv-id 42" in joined
    with pytest.raises(TunesmithError, match="needs --rdzv-endpoint"):
        torchrun_argv(p.parse_args(["--nnodes", "2", "--nproc-per-node", "8"]), "tunesmith", ["train"])


def test_worker_failures_without_nccl_keep_normal_exit():
    """`run_worker` returns codes and re-raises bugs as usual when no NCCL group is up (the
    os._exit path is for NCCL only; its end-to-end check is test_failures on CUDA)."""
    from tunesmith.cli.dist import run_worker

    assert run_worker(lambda: 2) == 2

    def bug() -> int:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_worker(bug)
