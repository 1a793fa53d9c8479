"""The MoE family under FSDP2 on 2 CPU/gloo ranks: full_shard with full activation
checkpointing reproduces the one-process run (same per-step losses and grad norms, tolerances of
tests/distributed/test_training.py; same final weights gathered from the expert shards), and
with the load-balancing loss full_shard matches DDP; so does LoRA on attention and on the
experts (peft.target_parameters, the adapters [E, r, in] / [E, out, r] sharded by expert) under
full_shard + full AC against its one-process run, saved adapter included. (The aux loss is each micro-batch's, so a
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
EXPERT_LORA = ("peft.method=lora", "peft.r=4", "peft.target_modules=[q_proj, v_proj]",
               "peft.target_parameters=[experts.gate_up_proj, experts.down_proj]")
# name -> (extra overrides, the run it must equal)
LAYOUTS = {"full_shard+full_ac": (FSDP_AC, "ref"),
           "aux_full_shard+full_ac": ((*AUX, *FSDP_AC), "aux_ddp"),
           "aux_ddp": ((*AUX, "parallel.strategy=no_shard"), "aux_full_shard+full_ac"),
           "lora_full_shard+full_ac": ((*EXPERT_LORA, *FSDP_AC), "lora_ref")}


@pytest.mark.skipif(not can_launch(2), reason="needs 2 ranks")
def test_moe_two_ranks_match_one_process(tmp_path, tiny_tokenizer_dir, demo_text) -> None:
    data = (tiny_tokenizer_dir, *demo_text)
    init = save_init(tmp_path / "init", preset="moe-tiny", overrides="model.overrides={}")
    ref = tmp_path / "ref"
    assert run(["-q", "train", *job(*data, ref, init=init)]) == 0
    assert run(["-q", "train", *job(*data, tmp_path / "lora_ref", init=init, extra=EXPERT_LORA)]) == 0
    run_jobs(2, [job(*data, tmp_path / name, dp=2, init=init, extra=extra)
                 for name, (extra, _) in LAYOUTS.items()], tmp_path)
    assert any(".mlp.experts.7.down_proj." in k for k in load_file(ref / "final" / "model.safetensors"))
    lora_keys = load_file(tmp_path / "lora_ref" / "final" / "adapter_model.safetensors")
    assert any(k.endswith(".mlp.experts.base_layer.lora_B.weight") for k in lora_keys)  # gate_up_proj's
    for name, (_, other) in LAYOUTS.items():
        got, want = losses(tmp_path / name), losses(tmp_path / other)
        assert len(got) == len(want) == 4
        for step, ((l, g), (l0, g0)) in enumerate(zip(got, want, strict=True), 1):
            assert abs(l - l0) < LOSS_ATOL, f"{name}: step {step} loss {l} vs {l0}"
            assert abs(g - g0) <= GRAD_RTOL * g0, f"{name}: step {step} grad norm {g} vs {g0}"
        file = "adapter_model.safetensors" if name.startswith("lora") else "model.safetensors"
        final = load_file(tmp_path / name / "final" / file)
        weights = load_file(tmp_path / other / "final" / file)
        assert final.keys() == weights.keys()
        for k in weights:
            torch.testing.assert_close(final[k], weights[k], atol=WEIGHT_ATOL, rtol=0, msg=f"{name}: {k}")
