"""The MoE family on 2 CPU/gloo ranks: FSDP2 full_shard with full activation checkpointing and
tensor parallelism (experts split between the TP ranks) reproduce the one-process run (same
per-step losses and grad norms, tolerances of tests/distributed/test_training.py; same final
weights gathered from the expert shards); with the load-balancing loss, TP matches one process
(one micro-batch: the same aux) and full_shard matches DDP. (The aux loss is each micro-batch's, so a
2-rank step's aux is the mean over the two ranks' halves, not one process's aux over the whole
batch: docs/tasks.md; those two are not compared.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.helpers import can_launch, job, losses, run_jobs, save_init
from tunesmith.cli.main import run

LOSS_ATOL, GRAD_RTOL, WEIGHT_ATOL = 1e-4, 1e-3, 1e-4
AUX = ("train.router_aux_loss_coef=0.02",)
FSDP_AC = ("parallel.strategy=full_shard", "parallel.activation_checkpointing=full")
# name -> (data-parallel degree, extra overrides, the run it must equal)
LAYOUTS = {"full_shard+full_ac": (2, FSDP_AC, "ref"),
           "aux_full_shard+full_ac": (2, (*AUX, *FSDP_AC), "aux_ddp"),
           "aux_ddp": (2, (*AUX, "parallel.strategy=no_shard"), "aux_full_shard+full_ac"),
           "tp2": (1, ("parallel.tp=2",), "ref"),
           "aux_tp2+full_ac": (1, (*AUX, "parallel.tp=2", "parallel.activation_checkpointing=full"),
                               "aux_ref")}


@pytest.mark.skipif(not can_launch(2), reason="needs 2 ranks")
def test_moe_two_ranks_match_one_process(tmp_path, tiny_tokenizer_dir, demo_text) -> None:
    data = (tiny_tokenizer_dir, *demo_text)
    init = save_init(tmp_path / "init", preset="moe-tiny", overrides="model.overrides={}")
    ref = tmp_path / "ref"
    assert run(["-q", "train", *job(*data, ref, init=init)]) == 0
    assert run(["-q", "train", *job(*data, tmp_path / "aux_ref", init=init, extra=AUX)]) == 0
    run_jobs(2, [job(*data, tmp_path / name, dp=dp, init=init, extra=extra)
                 for name, (dp, extra, _) in LAYOUTS.items()], tmp_path)
    assert any(".mlp.experts.7.down_proj." in k for k in load_file(ref / "final" / "model.safetensors"))
    for name, (_, _, other) in LAYOUTS.items():
        got, want = losses(tmp_path / name), losses(tmp_path / other)
        assert len(got) == len(want) == 4
        for step, ((l, g), (l0, g0)) in enumerate(zip(got, want, strict=True), 1):
            assert abs(l - l0) < LOSS_ATOL, f"{name}: step {step} loss {l} vs {l0}"
            assert abs(g - g0) <= GRAD_RTOL * g0, f"{name}: step {step} grad norm {g} vs {g0}"
        final = load_file(tmp_path / name / "final" / "model.safetensors")
        weights = load_file(tmp_path / other / "final" / "model.safetensors")
        assert final.keys() == weights.keys()
        for k in weights:
            torch.testing.assert_close(final[k], weights[k], atol=WEIGHT_ATOL, rtol=0, msg=f"{name}: {k}")
