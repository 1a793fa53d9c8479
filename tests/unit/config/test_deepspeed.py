"""config/deepspeed.py: a DeepSpeed JSON config translated to parallel/train/optim settings."""

from __future__ import annotations

import json
import logging

import pytest

from tunesmith.cli.main import run
from tunesmith.config import load_config
from tunesmith.config.deepspeed import apply_deepspeed, map_deepspeed
from tunesmith.errors import TunesmithError


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

