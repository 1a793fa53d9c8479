"""LoRA, DoRA, Llama-Adapter and layer freezing compose with FSDP2 and DDP: on 2 ranks (gloo) they reproduce
the one-process run (losses, grad norms, saved PEFT adapter), with activation checkpointing
too, and a sharded LoRA checkpoint (trainable tensors only) resumes exactly.

Every run starts from the same saved base (streamed into the shards) and the same seeded
adapters (`init_adapters` draws each full tensor on the host in module order, so sharding does
not change them). Tolerances as in test_training: 1e-4 on the loss, 1e-3 relative on the grad
norm, 1e-4 on the adapter weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.helpers import (
    assert_resumed_exactly,
    job,
    resume_jobs,
    run_jobs,
    save_init,
    skip_unless_ranks,
)
from tests.distributed.test_training import GRAD_RTOL, LOSS_ATOL, WEIGHT_ATOL, _assert_same
from tunesmith.cli.main import run

pytestmark = pytest.mark.slow

LORA = ("peft.method=lora", "peft.r=4", "peft.alpha=8")
METHODS = {
    "lora": LORA,
    "dora": ("peft.method=dora", "peft.r=4", "peft.alpha=8"),
    "freeze": ("peft.num_freeze_layers=1", "peft.freeze_embeddings=true"),
    # prompts [1, L, D] and gates [1] shard on a dim of size 1: one rank holds them, one is empty
    "llama_adapter": ("peft.method=llama_adapter", "peft.adapter_len=4", "peft.adapter_layers=2",
                      "optim.lr=5e-2"),
}
# name -> (method, extra overrides) on 2 ranks
LAYOUTS = {
    "lora_full_shard": ("lora", ("parallel.strategy=full_shard",)),
    "lora_shard_grad_op+full_ac": ("lora", ("parallel.strategy=shard_grad_op",
                                            "parallel.activation_checkpointing=full")),
    "lora_ddp": ("lora", ("parallel.strategy=no_shard",)),
    "dora_full_shard": ("dora", ("parallel.strategy=full_shard",)),
    "freeze_full_shard": ("freeze", ("parallel.strategy=full_shard",)),
    "llama_adapter_full_shard+full_ac": ("llama_adapter", ("parallel.strategy=full_shard",
                                                           "parallel.activation_checkpointing=full")),
    "llama_adapter_ddp": ("llama_adapter", ("parallel.strategy=no_shard",)),
    # tensor parallel (one data-parallel group: both ranks see the whole batch)
    "lora_tp2": ("lora", ("parallel.tp=2",)),
    "freeze_tp2": ("freeze", ("parallel.tp=2",)),
}
# Checkpoint at 3 and resume to 6; constant schedule so the 3-step run has the same LRs.
RESUME = (*LORA, "parallel.strategy=full_shard", "schedule.name=constant", "checkpoint.every_steps=3")


@pytest.fixture(scope="module")
def setup(tiny_tokenizer_dir, demo_text, tmp_path_factory):
    train, valid = demo_text
    data = (tiny_tokenizer_dir, train, valid)
    root = tmp_path_factory.mktemp("peft")
    init = save_init(root / "init", tied=False)
    ref = {}
    for method, extra in METHODS.items():
        d = root / f"ref_{method}"
        assert run(["-q", "train", *job(*data, d, extra=extra, init=init)]) == 0
        ref[method] = d
    jobs = [job(*data, root / name, dp=1 if "tp2" in name else 2, extra=(*METHODS[m], *extra), init=init)
            for name, (m, extra) in LAYOUTS.items()]
    jobs += resume_jobs(data, root, RESUME, init)
    run_jobs(2, jobs)
    return root, ref


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_peft_on_two_ranks_matches_one_process(setup, name):
    root, ref = setup
    method = LAYOUTS[name][0]
    _assert_same(root / name, ref[method], name)
    if method == "freeze":
        return
    got = load_file(root / name / "final" / "adapter_model.safetensors")
    want = load_file(ref[method] / "final" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and any(k.endswith(("lora_B.weight", "adaption_gate")) for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=WEIGHT_ATOL, rtol=0, msg=f"{name}: {k}")
    cfg = json.loads((root / name / "final" / "adapter_config.json").read_text())
    assert cfg == json.loads((ref[method] / "final" / "adapter_config.json").read_text())


def test_sharded_lora_checkpoint_is_small_and_resumes_exactly(setup):
    root, _ = setup
    # The sharded checkpoint holds the adapters (and their optimizer state), not the frozen base.
    keys = assert_resumed_exactly(root, LOSS_ATOL, GRAD_RTOL)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_A" in k or ".lora_B" in k for k in model_keys), model_keys[:5]
    assert any(k.startswith("optim.state.") and ".lora_A" in k for k in keys)


def test_lora_on_fsdp2_x_tp_matches_one_process_and_resumes(setup, tiny_tokenizer_dir, demo_text, tmp_path):
    """2-D: FSDP2 over 2 data-parallel ranks x TP 2 (4 ranks). The TP-sharded LoRA layers are
    sharded again by FSDP2; the run reproduces the one-process LoRA run, and its checkpoint
    (DTensors over the 2-D mesh) resumes exactly."""
    skip_unless_ranks(4)
    root, ref = setup
    data = (tiny_tokenizer_dir, *demo_text)
    two_d = ("parallel.strategy=full_shard", "parallel.tp=2")
    jobs = [job(*data, tmp_path / "lora_2d", dp=2, extra=(*LORA, *two_d), init=root / "init")]
    jobs += resume_jobs(data, tmp_path, (*RESUME, "parallel.tp=2"), root / "init")
    run_jobs(4, jobs)
    _assert_same(tmp_path / "lora_2d", ref["lora"], "lora_2d")
    got = load_file(tmp_path / "lora_2d" / "final" / "adapter_model.safetensors")
    want = load_file(ref["lora"] / "final" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=WEIGHT_ATOL, rtol=0, msg=f"lora_2d: {k}")
    assert_resumed_exactly(tmp_path, LOSS_ATOL, GRAD_RTOL)
