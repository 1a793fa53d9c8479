"""FSDP2 (each strategy), DDP, TP and 2-D runs (MoE: FSDP2 x TP, and expert parallelism with
two expert groups) on CPU/gloo reproduce the one-process run, and
a DCP checkpoint saved on 4 ranks resumes on 2 ranks and on 1 process (and one saved by 1
process on 2 ranks) with the same losses.

Every layout trains the same tiny Llama from the same saved init (streamed into each rank's
shards) on the same global batch
(8 sequences of 64 tokens per step; micro-batch = 8 / data-parallel degree), so the per-step
losses and gradient norms must agree up to float32 reduction order. Stated tolerance: 1e-4
absolute on the loss, 1e-3 relative on the grad norm, over 4 optimizer steps (measured: ~1e-6).
The final HF export (gathered from shards by rank 0) must match the one-process weights
within 1e-4 absolute (measured: ~2e-5).

The runs are pinned to CPU/gloo (also on GPU machines). `TUNESMITH_TEST_DEVICE=cuda` runs the same
tests on CUDA/NCCL, one GPU a rank (4 GPUs for all of them).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.helpers import GPT2_OVERRIDES, can_launch, job, losses, run_jobs, save_init
from tests.gemma3_multimodal import as_image_text
from tunesmith.cli.main import run

# Runs that checkpoint at step 3 and run on to 6 (the uninterrupted runs to compare with).
CKPT_STEPS = ("train.max_steps=6", "checkpoint.every_steps=3", "parallel.strategy=full_shard")
QWEN3_OVERRIDES = ("model.overrides={vocab_size: 512, dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, "
                   "head_dim: 16, intermediate_size: 128, max_position_embeddings: 512}")
GEMMA_OVERRIDES = "model.overrides={vocab_size: 512}"  # gemma3-tiny as it is (the tokenizer has 512)
# Adam turns float32 reduction-order noise in tiny gradients into ~1e-5 weight differences.
LOSS_ATOL, GRAD_RTOL, WEIGHT_ATOL = 1e-4, 1e-3, 1e-4


@pytest.fixture(scope="module")
def data(tiny_tokenizer_dir, demo_text):
    train, valid = demo_text
    return tiny_tokenizer_dir, train, valid


@pytest.fixture(scope="module")
def inits(tmp_path_factory):
    """Saved initial models {tied: dir}: the layouts load them (sharded streaming load)."""
    root = tmp_path_factory.mktemp("init")
    out = {tied: save_init(root / f"tied{int(tied)}", tied) for tied in (True, False)}
    out["gpt2"] = save_init(root / "gpt2", preset="gpt2-tiny", overrides=GPT2_OVERRIDES)
    out["gptj"] = save_init(root / "gptj", preset="gptj-tiny", overrides=GPT2_OVERRIDES)
    out["qwen3"] = save_init(root / "qwen3", preset="qwen3-0.6b", overrides=QWEN3_OVERRIDES)
    out["gemma"] = save_init(root / "gemma", preset="gemma3-tiny", overrides=GEMMA_OVERRIDES)
    out["moe"] = save_init(root / "moe", preset="moe-tiny", overrides="model.overrides={}")
    # The same weights as an image+text Gemma 3 checkpoint: its text tower streams into the
    # shards (prefixed names, vision tensors skipped) and trains as the text checkpoint does.
    out["gemma3_image_text"] = as_image_text(out["gemma"], root / "gemma3_image_text")
    return out


@pytest.fixture(scope="module")
def reference(data, inits, tmp_path_factory):
    """One-process runs, tied and untied embeddings: {tied: run dir}."""
    root = tmp_path_factory.mktemp("ref")
    out = {}
    for tied in (True, False):
        d = root / f"tied{int(tied)}"
        assert run(["-q", "train", *job(*data, d, init=inits[tied])]) == 0
        out[tied] = d
    d = root / "scratch"  # seeded from-scratch init, tied
    assert run(["-q", "train", *job(*data, d)]) == 0
    out["scratch"] = d
    d = root / "gpt2"  # another family (learned positions, tied, biases, Conv1D layout in HF)
    assert run(["-q", "train", *job(*data, d, init=inits["gpt2"])]) == 0
    out["gpt2"] = d
    d = root / "gptj"  # parallel attention + MLP, interleaved partial rotary, head bias
    assert run(["-q", "train", *job(*data, d, init=inits["gptj"])]) == 0
    out["gptj"] = d
    d = root / "qwen3"  # per-head q/k RMSNorm weights, sharded like the other norms
    assert run(["-q", "train", *job(*data, d, init=inits["qwen3"])]) == 0
    out["qwen3"] = d
    d = root / "gemma"  # four norms a block, q/k norms, sliding-window layers (block 64 > window 16)
    assert run(["-q", "train", *job(*data, d, init=inits["gemma"])]) == 0
    out["gemma"] = d
    d = root / "moe"  # experts split by TP / EP (tests/distributed/test_moe.py: 2 ranks)
    assert run(["-q", "train", *job(*data, d, init=inits["moe"])]) == 0
    out["moe"] = d
    d = root / "ckpt1"  # one process, checkpoint at step 3: resumed on 2 ranks below
    assert run(["-q", "train", *job(*data, d, tied=False, extra=CKPT_STEPS)]) == 0
    out["ckpt1"] = d
    return out


def _assert_same(run_dir, ref_dir, what):
    got, want = losses(run_dir), losses(ref_dir)
    assert len(got) == len(want) == 4, what
    for step, ((l, g), (l0, g0)) in enumerate(zip(got, want, strict=True), 1):
        assert abs(l - l0) < LOSS_ATOL, f"{what}: step {step} loss {l} vs {l0}"
        assert abs(g - g0) <= GRAD_RTOL * g0, f"{what}: step {step} grad norm {g} vs {g0}"


def _assert_same_weights(run_dir, ref_dir, what):
    got = load_file(run_dir / "final" / "model.safetensors")
    want = load_file(ref_dir / "final" / "model.safetensors")
    assert got.keys() == want.keys(), what
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=WEIGHT_ATOL, rtol=0, msg=f"{what}: {k}")


# name -> (world size, data-parallel degree, reference: tied | "scratch" | family, extra overrides)
LAYOUTS = {
    "gpt2_full_shard": (2, 2, "gpt2", ("parallel.strategy=full_shard",)),
    # recipes/gptj_clm_wikitext.yaml's layout: ZeRO-2 as shard_grad_op, full AC
    "gptj_shard_grad_op+full_ac": (2, 2, "gptj", ("parallel.strategy=shard_grad_op",
                                                  "parallel.activation_checkpointing=full")),
    "full_shard_from_scratch": (2, 2, "scratch", ("parallel.strategy=full_shard",)),
    "qwen3_full_shard": (2, 2, "qwen3", ("parallel.strategy=full_shard",)),
    "full_shard": (2, 2, False, ("parallel.strategy=full_shard",)),
    "shard_grad_op+selective_ac": (2, 2, True, ("parallel.strategy=shard_grad_op",
                                                "parallel.activation_checkpointing=selective")),
    "no_shard_ddp+full_ac": (2, 2, False, ("parallel.strategy=no_shard",
                                            "parallel.activation_checkpointing=full")),
    "tp2": (2, 1, True, ("parallel.tp=2",)),
    "qwen3_tp2": (2, 1, "qwen3", ("parallel.tp=2",)),
    "gemma_full_shard": (2, 2, "gemma", ("parallel.strategy=full_shard",)),
    "gemma_tp2": (2, 1, "gemma", ("parallel.tp=2",)),
    "gemma3_image_text_full_shard": (2, 2, "gemma", ("parallel.strategy=full_shard",)),
    "tp2_gathered_head": (2, 1, False, ("parallel.tp=2", "parallel.loss_parallel=false")),
    "tp2_compiled+selective_ac": (2, 1, False, ("parallel.tp=2", "train.compile=true",
                                                "parallel.activation_checkpointing=selective")),
    "hybrid_shard_2x2": (4, 4, False, ("parallel.strategy=hybrid_shard", "parallel.dp_replicate=2",
                                        "parallel.dp_shard=2")),
    "2d_fsdp2_x_tp2": (4, 2, True, ("parallel.strategy=full_shard", "parallel.tp=2",
                                    "parallel.activation_checkpointing=selective")),
    "moe_2d_fsdp2_x_tp2": (4, 2, "moe", ("parallel.strategy=full_shard", "parallel.tp=2",
                                         "parallel.activation_checkpointing=full")),
    # expert parallelism in 2 groups of 2: each expert's shard replicated over 2 ranks
    "moe_ep2_x_dp4": (4, 4, "moe", ("parallel.ep=2",)),
    "hsdp_shard1_x_tp2": (4, 2, False, ("parallel.strategy=hybrid_shard", "parallel.dp_shard=1",
                                        "parallel.tp=2")),
}

# Layouts that start from another saved init than their reference run's (the same weights).
INIT_OF = {"gemma3_image_text_full_shard": "gemma3_image_text"}


def _layout_jobs(world, data, inits, root):
    # Sharded from-scratch init equals the one-process init on CPU only (GPU: DTensor's RNG).
    names = [n for n, spec in LAYOUTS.items()
             if spec[0] == world and not (spec[2] == "scratch" and torch.cuda.is_available())]
    jobs = []
    for name in names:
        _, dp, tied, extra = LAYOUTS[name]
        init = None if tied == "scratch" else inits[INIT_OF.get(name, tied)]
        jobs.append(job(*data, root / name, dp=dp, extra=extra, init=init))
    return names, jobs


@pytest.fixture(scope="module")
def world4(data, inits, tmp_path_factory):
    # The checkpointed run starts from the seeded from-scratch init (sharded init path).
    root = tmp_path_factory.mktemp("w4")
    names, jobs = _layout_jobs(4, data, inits, root)
    jobs.append(job(*data, root / "ckpt4", dp=4, tied=False, extra=CKPT_STEPS))
    run_jobs(4, jobs)
    return root, names


@pytest.fixture(scope="module")
def world2(data, inits, reference, tmp_path_factory, request):
    """The 2-rank layouts, the 4-rank checkpoint resumed on 2 ranks (only where 4 ranks can
    run: on 2 GPUs the rest still runs), and the one-process checkpoint resumed on 2 ranks
    (more ranks than saved it), in one launch."""
    root = tmp_path_factory.mktemp("w2")
    names, jobs = _layout_jobs(2, data, inits, root)
    if can_launch(4):
        world4 = request.getfixturevalue("world4")
        shutil.copytree(world4[0] / "ckpt4", root / "resume2")
        jobs.append(job(*data, root / "resume2", dp=2, tied=False,
                        extra=(*CKPT_STEPS, "checkpoint.resume=3")))
    shutil.copytree(reference["ckpt1"], root / "resume1to2")
    jobs.append(job(*data, root / "resume1to2", dp=2, tied=False,
                    extra=(*CKPT_STEPS, "checkpoint.resume=3")))
    run_jobs(2, jobs)
    return root, names


def _check_layouts(root, names, reference):
    for name in names:
        tied = LAYOUTS[name][2]
        _assert_same(root / name, reference[tied], name)
        _assert_same_weights(root / name, reference[tied], name)


def test_two_rank_layouts_match_single_process(world2, reference):
    _check_layouts(*world2, reference)


def test_four_rank_layouts_match_single_process(world4, reference):
    _check_layouts(*world4, reference)


def test_checkpoint_from_4_ranks_resumes_on_2_and_1(data, world4, world2, tmp_path):
    """DCP reshards the FSDP2 model/optimizer state; the loader resumes the same global batches."""
    uninterrupted = losses(world4[0] / "ckpt4")
    assert len(uninterrupted) == 6
    one = tmp_path / "resume1"
    shutil.copytree(world4[0] / "ckpt4", one)
    assert run(["-q", "train", *job(*data, one, dp=1, tied=False,
                                     extra=(*CKPT_STEPS, "checkpoint.resume=3"))]) == 0
    for name, run_dir in (("2 ranks", world2[0] / "resume2"), ("1 process", one)):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["resumed_from"].endswith("step_00000003"), name  # steps 4-6 ran from it
        resumed = losses(run_dir)
        assert len(resumed) == 6, name  # steps 1-3 kept from the checkpointed run, 4-6 new
        for step, ((l, g), (l0, g0)) in enumerate(zip(resumed, uninterrupted, strict=True), 1):
            assert abs(l - l0) < LOSS_ATOL, f"{name}: step {step} loss {l} vs {l0}"
            assert abs(g - g0) <= GRAD_RTOL * g0, f"{name}: step {step} grad norm {g} vs {g0}"
        _assert_same_weights(run_dir, world4[0] / "ckpt4", name)


def test_checkpoint_from_1_process_resumes_on_2_ranks(world2, reference):
    """Scale-up: rank 1 takes saved rank 0's RNG streams; model/optimizer/loader reshard."""
    run_dir, uninterrupted = world2[0] / "resume1to2", losses(reference["ckpt1"])
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"].endswith("step_00000003")
    resumed = losses(run_dir)
    assert len(resumed) == len(uninterrupted) == 6
    for step, ((l, g), (l0, g0)) in enumerate(zip(resumed, uninterrupted, strict=True), 1):
        assert abs(l - l0) < LOSS_ATOL, f"step {step} loss {l} vs {l0}"
        assert abs(g - g0) <= GRAD_RTOL * g0, f"step {step} grad norm {g} vs {g0}"
    _assert_same_weights(run_dir, reference["ckpt1"], "1 -> 2 ranks")


def test_export_of_a_4_rank_checkpoint_streams_the_final_weights(world4, tmp_path):
    """`tunesmith export` on the DCP shards of 4 ranks, on one CPU process, file by file."""
    run_dir = world4[0] / "ckpt4"  # its last checkpoint (step 6) is the final model
    out = tmp_path / "hf"
    assert run(["-q", "export", str(run_dir), "--out", str(out), "--max-shard-size", "100KB"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1
    got: dict[str, torch.Tensor] = {}
    for f in out.glob("model-*.safetensors"):
        got.update(load_file(f))
    want = load_file(run_dir / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0, msg=k)
