"""parallel/layout.py on CPU: degrees from the strategy, one-line refusals of layouts that cannot
work (world size, the model's heads, the sequence, single-process features), all before any
process group exists."""

from __future__ import annotations

import pytest

from tunesmith.config import load_config
from tunesmith.config.schema import ParallelConfig
from tunesmith.errors import TunesmithError
from tunesmith.models import resolve_model_config
from tunesmith.parallel.layout import check_run, resolve_layout


def layout(world: int, local: int | None = None, **kw):
    return resolve_layout(ParallelConfig(**kw), world, local)


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

