"""The MoE family on 2 CPU/gloo ranks, one launch: FSDP2 full_shard with full activation
checkpointing, tensor parallelism (experts split between the TP ranks) and expert parallelism
(ep=2: experts split between the data-parallel ranks, tokens exchanged by all-to-all) reproduce
the one-process run (same per-step losses and grad norms, tolerances of
tests/distributed/test_training.py; same final weights gathered from the expert shards). With the
load-balancing loss, TP matches one process (one micro-batch: the same aux), and full_shard, EP
and DDP match each other; so does LoRA on attention and on the experts (peft.target_parameters,
the adapters [E, r, in] / [E, out, r] sharded by expert) under full_shard + full AC against its
one-process run, saved adapter included, and so does LoRA on the experts under ep=2 and tp=2
(the adapters split by expert with the experts); so does context parallelism (cp=2) with the aux loss,
whose routing counts are summed over the cp ranks. (The aux loss is each micro-batch's, so a 2-rank step's aux is the mean
over the two ranks' halves, not one process's aux over the whole batch: docs/tasks.md; those two
are not compared.) An EP run checkpointed at step 3 resumes exactly, on 2 ranks with EP and on
one process, and `tunesmith export` of its DCP shards gives its final weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.helpers import (
    assert_resumed_exactly,
    can_launch,
    job,
    losses,
    resume_jobs,
    run_jobs,
    save_init,
)
from tunesmith.cli.main import run

LOSS_ATOL, GRAD_RTOL, WEIGHT_ATOL = 1e-4, 1e-3, 1e-4
AUX = ("train.router_aux_loss_coef=0.02",)
FSDP_AC = ("parallel.strategy=full_shard", "parallel.activation_checkpointing=full")
EP = ("parallel.ep=2",)
EXPERT_LORA = ("peft.method=lora", "peft.r=4", "peft.target_modules=[q_proj, v_proj]",
               "peft.target_parameters=[experts.gate_up_proj, experts.down_proj]")
# name -> (data-parallel degree, extra overrides, the run it must equal)
LAYOUTS = {"full_shard+full_ac": (2, FSDP_AC, "ref"),
           "aux_full_shard+full_ac": (2, (*AUX, *FSDP_AC), "aux_ddp"),
           "aux_ddp": (2, (*AUX, "parallel.strategy=no_shard"), "aux_full_shard+full_ac"),
           "tp2": (1, ("parallel.tp=2",), "ref"),
           "aux_tp2+full_ac": (1, (*AUX, "parallel.tp=2", "parallel.activation_checkpointing=full"),
                               "aux_ref"),
           "ep2": (2, EP, "ref"),
           "aux_ep2+shard_grad_op+full_ac": (2, (*AUX, *EP, "parallel.strategy=shard_grad_op",
                                                 "parallel.activation_checkpointing=full"),
                                             "aux_full_shard+full_ac"),
           "lora_full_shard+full_ac": (2, (*EXPERT_LORA, *FSDP_AC), "lora_ref"),
           # the sequence split over 2 ranks: the aux loss is still the whole micro-batch's
           "aux_cp2": (1, (*AUX, "parallel.cp=2"), "aux_ref"),
           # LoRA on the experts split with them (A [E, r, in] / B [E, out, r] Shard(0))
           "lora_ep2": (2, (*EXPERT_LORA, *EP), "lora_ref"),
           "lora_tp2": (1, (*EXPERT_LORA, "parallel.tp=2"), "lora_ref")}
# Checkpoint at 3 and resume to 6; constant schedule so the 3-step run has the same LRs.
RESUME = (*EP, "schedule.name=constant", "checkpoint.every_steps=3")


@pytest.fixture(scope="module")
def moe2(tiny_tokenizer_dir, demo_text, tmp_path_factory):
    """Every 2-rank run in one launch, plus the one-process references: (root, data, init)."""
    root = tmp_path_factory.mktemp("moe2")
    data = (tiny_tokenizer_dir, *demo_text)
    init = save_init(root / "init", preset="moe-tiny", overrides="model.overrides={}")
    assert run(["-q", "train", *job(*data, root / "ref", init=init)]) == 0
    assert run(["-q", "train", *job(*data, root / "aux_ref", init=init, extra=AUX)]) == 0
    assert run(["-q", "train", *job(*data, root / "lora_ref", init=init, extra=EXPERT_LORA)]) == 0
    jobs = [job(*data, root / name, dp=dp, init=init, extra=extra)
            for name, (dp, extra, _) in LAYOUTS.items()]
    run_jobs(2, jobs + resume_jobs(data, root, RESUME, init))
    return root, data, init


@pytest.mark.skipif(not can_launch(2), reason="needs 2 ranks")
def test_moe_two_ranks_match_one_process(moe2) -> None:
    root = moe2[0]
    assert any(".mlp.experts.7.down_proj." in k for k in load_file(root / "ref" / "final" / "model.safetensors"))
    lora_keys = load_file(root / "lora_ref" / "final" / "adapter_model.safetensors")
    assert any(k.endswith(".mlp.experts.base_layer.lora_B.weight") for k in lora_keys)  # gate_up_proj's
    for name, (_, _, other) in LAYOUTS.items():
        got, want = losses(root / name), losses(root / other)
        assert len(got) == len(want) == 4
        for step, ((l, g), (l0, g0)) in enumerate(zip(got, want, strict=True), 1):
            assert abs(l - l0) < LOSS_ATOL, f"{name}: step {step} loss {l} vs {l0}"
            assert abs(g - g0) <= GRAD_RTOL * g0, f"{name}: step {step} grad norm {g} vs {g0}"
        file = "adapter_model.safetensors" if name.startswith("lora") else "model.safetensors"
        final = load_file(root / name / "final" / file)
        weights = load_file(root / other / "final" / file)
        assert final.keys() == weights.keys()
        for k in weights:
            torch.testing.assert_close(final[k], weights[k], atol=WEIGHT_ATOL, rtol=0, msg=f"{name}: {k}")


@pytest.mark.skipif(not can_launch(2), reason="needs 2 ranks")
def test_context_parallel_aux_loss_is_the_whole_sequences(moe2) -> None:
    """With the sequence split over cp=2 ranks, the logged load-balancing loss is one process's
    (routing counts summed over the cp ranks), not the mean of two halves' losses."""
    root = moe2[0]

    def aux(name: str) -> list[float]:
        recs = [json.loads(ln) for ln in (root / name / "metrics.jsonl").read_text().splitlines()]
        return [r["router_aux_loss"] for r in recs if "router_aux_loss" in r]

    got, want = aux("aux_cp2"), aux("aux_ref")
    assert len(got) == len(want) >= 1
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.skipif(not can_launch(2), reason="needs 2 ranks")
def test_expert_parallel_checkpoint_resumes_reshards_and_exports(moe2, tmp_path) -> None:
    """The EP checkpoint holds the whole [E, ...] expert tensors (DCP: reshardable), resumes
    exactly on 2 ranks with EP and on one process without, and exports the final weights."""
    root, data, init = moe2
    keys = assert_resumed_exactly(root, LOSS_ATOL, GRAD_RTOL)
    assert "model.layers.1.feed_forward.experts.w13" in keys
    assert any(k.startswith("optim.state.") and k.endswith("experts.w2.exp_avg") for k in keys), keys[:5]
    full = root / "resume_full"
    one = tmp_path / "resume1"
    shutil.copytree(root / "resume_part", one)
    shutil.rmtree(one / "checkpoints" / "step_00000006")
    assert run(["-q", "train", *job(*data, one, steps=6, init=init,
                                     extra=(*RESUME[1:], "checkpoint.resume=3"))]) == 0
    for step, ((l, g), (l0, g0)) in enumerate(zip(losses(one), losses(full), strict=True), 1):
        assert abs(l - l0) < LOSS_ATOL, f"1 process: step {step} loss {l} vs {l0}"
        assert abs(g - g0) <= GRAD_RTOL * g0, f"1 process: step {step} grad norm {g} vs {g0}"
    want = load_file(full / "final" / "model.safetensors")
    for got in (load_file(one / "final" / "model.safetensors"), _export(full, tmp_path / "hf")):
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=WEIGHT_ATOL, rtol=0, msg=k)


def _export(run_dir, out):
    """`tunesmith export` of the run's last DCP checkpoint (step 6: the final model)."""
    assert run(["-q", "export", str(run_dir), "--out", str(out)]) == 0
    got: dict[str, torch.Tensor] = {}
    for f in out.glob("model*.safetensors"):
        got.update(load_file(f))
    return got
