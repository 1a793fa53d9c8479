"""QLoRA under FSDP2, HSDP and DDP: on 2 ranks (gloo) the NF4 base is sharded (each rank holds
half of every weight's 4-bit codes and scales) and the run reproduces one process: losses,
grad norms and the saved PEFT adapter; a sharded QLoRA checkpoint resumes exactly; an MoE with
NF4 expert stacks (and LoRA on them) shards and matches one process too.

The model is a Llama whose block linear weights all hold a multiple of 2 x 64 x 256 elements,
so each NF4 weight splits into two whole shards (see `quant.check_shardable`).

Tolerances: the loss and grad norm as in test_training (1e-4, 1e-3 relative). QLoRA computes
the base matmuls in bf16, so the order in which the batch's gradient is summed (two ranks vs
one process) moves the adapters more than in fp32: after 4 Adam steps at lr 3e-3 one process
alone differs by up to 2.6e-4 between micro-batch 8 and 2 x 4 accumulation (measured
2026-12-01, torch 2.13 CPU), so adapters are compared at 1e-3 absolute (a third of one step).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.helpers import assert_resumed_exactly, job, resume_jobs, run_jobs, save_init
from tests.distributed.test_training import GRAD_RTOL, LOSS_ATOL, _assert_same
from tunesmith.cli.main import run
from tunesmith.peft import nf4_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not nf4_available(), reason="torchao with NF4Tensor is not installed")]

# dim 256, GQA 4/2 heads: q/o 256x256, k/v 128x256, MLP 512x256 -- 2, 1, 4 NF4 factor blocks a rank.
QLORA_MODEL = ("model.overrides={vocab_size: 512, dim: 256, n_layers: 2, n_heads: 4, n_kv_heads: 2, "
               "intermediate_size: 512, max_position_embeddings: 512, tie_word_embeddings: false}")
QLORA = ("peft.method=qlora", "peft.r=4", "peft.alpha=8")
ADAPTER_ATOL = 1e-3
LAYOUTS = {
    "full_shard": ("parallel.strategy=full_shard",),
    "hsdp+full_ac": ("parallel.strategy=hybrid_shard", "parallel.activation_checkpointing=full"),
    "ddp": ("parallel.strategy=no_shard",),
}
RESUME = (*QLORA, "parallel.strategy=full_shard", "schedule.name=constant", "checkpoint.every_steps=3")
# MoE (Qwen3-MoE shape): attention 256x256 / 128x256, expert stacks w13 [8, 128, 256] and
# w2 [8, 256, 64] stored as NF4 [E*out, in], split by rows: 4 whole experts a rank.
MOE_MODEL = ("model.overrides={vocab_size: 512, dim: 256, n_layers: 2, n_heads: 4, n_kv_heads: 2, "
             "head_dim: 64, moe_intermediate_size: 64, max_position_embeddings: 512}")
MOE_QLORA = (*QLORA, "peft.target_parameters=[experts.gate_up_proj, experts.down_proj]")


@pytest.fixture(scope="module")
def setup(tiny_tokenizer_dir, demo_text, tmp_path_factory):
    train, valid = demo_text
    data = (tiny_tokenizer_dir, train, valid)
    root = tmp_path_factory.mktemp("qlora")
    init = save_init(root / "init", overrides=QLORA_MODEL)
    ref = root / "ref"
    assert run(["-q", "train", *job(*data, ref, extra=QLORA, init=init)]) == 0
    moe_init = save_init(root / "moe_init", preset="moe-tiny", overrides=MOE_MODEL)
    assert run(["-q", "train", *job(*data, root / "moe_ref", extra=MOE_QLORA, init=moe_init)]) == 0
    jobs = [job(*data, root / name, dp=2, extra=(*QLORA, *extra), init=init) for name, extra in LAYOUTS.items()]
    jobs += resume_jobs(data, root, RESUME, init)
    jobs.append(job(*data, root / "moe_full_shard", dp=2, extra=(*MOE_QLORA, "parallel.strategy=full_shard"),
                    init=moe_init))
    run_jobs(2, jobs)
    return root, ref


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_qlora_on_two_ranks_matches_one_process(setup, name):
    root, ref = setup
    _assert_same(root / name, ref, name)
    got = load_file(root / name / "final" / "adapter_model.safetensors")
    want = load_file(ref / "final" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and sum("lora_A" in k for k in got) == 14  # 7 linears x 2 blocks
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ADAPTER_ATOL, rtol=0, msg=f"{name}: {k}")
    assert json.loads((root / name / "final" / "adapter_config.json").read_text()) == \
        json.loads((ref / "final" / "adapter_config.json").read_text())


def test_sharded_qlora_checkpoint_holds_adapters_and_resumes_exactly(setup):
    root, _ = setup
    keys = assert_resumed_exactly(root, LOSS_ATOL, GRAD_RTOL)
    model_keys = [k for k in keys if k.startswith("model.")]
    # Adapters only: the NF4 base is quantised again from model.name on resume, never saved.
    assert model_keys and all(".lora_A" in k or ".lora_B" in k for k in model_keys), model_keys[:5]


def test_moe_qlora_with_nf4_experts_on_two_ranks_matches_one_process(setup):
    """QLoRA on an MoE (LoRA on attention and the experts) under FSDP2: each rank holds half
    of every NF4 expert stack's rows; losses, grad norms and the adapter match one process."""
    root, _ = setup
    _assert_same(root / "moe_full_shard", root / "moe_ref", "moe_full_shard")
    got = load_file(root / "moe_full_shard" / "final" / "adapter_model.safetensors")
    want = load_file(root / "moe_ref" / "final" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and any(".mlp.experts." in k for k in got)
    # An expert sees few tokens, so some of its adapter elements get gradients near zero, where
    # Adam's normalised step turns the bf16 summation order's noise (and CPU GEMM threading's:
    # it varies from run to run) into whole steps of either sign (lr 3e-3; measured over runs:
    # max 2.2e-3 to 4.2e-3, up to 1.5% of an expert tensor's elements over 1e-3, relative
    # difference of the whole tensor < 1%; 2026-12-01, torch 2.13 CPU). Bounds: two steps per
    # element and 3% of the tensor's norm for the experts; ADAPTER_ATOL for attention.
    for k in want:
        diff = (got[k] - want[k]).abs()
        if ".experts." in k:
            assert diff.max() <= 6e-3 and diff.norm() <= 0.03 * want[k].norm(), (k, diff.max().item())
        else:
            assert diff.max() <= ADAPTER_ATOL, (k, diff.max().item())
