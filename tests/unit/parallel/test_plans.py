"""parallel/ on CPU: layout rules read from the family descriptors, activation checkpointing,
and the Llama tensor-parallel plan applied over a one-rank gloo mesh."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from tests.peft_utils import ids, tiny_model
from tunesmith.config import load_config
from tunesmith.config.schema import ParallelConfig
from tunesmith.errors import TunesmithError
from tunesmith.models import families, resolve_model_config
from tunesmith.parallel import apply_activation_checkpointing
from tunesmith.parallel.layout import check_run, resolve_layout
from tunesmith.parallel.tp import apply_tp


def test_layout_fills_degrees_and_describes_them():
    lay = resolve_layout(ParallelConfig(tp=2), 8, 8)
    assert (lay.dp_replicate, lay.dp_shard, lay.tp, lay.dp) == (1, 4, 2, 4)
    assert lay.sharded and lay.mesh_shape == (1, 4, 1, 2)  # (dp_replicate, dp_shard, cp, tp)
    hsdp = resolve_layout(ParallelConfig(strategy="hybrid_shard"), 16, 8)
    assert (hsdp.dp_replicate, hsdp.dp_shard) == (2, 8)
    with pytest.raises(TunesmithError, match="does not divide the world size 6"):
        resolve_layout(ParallelConfig(tp=4), 6, 6)


def test_only_families_declaring_a_plan_accept_tp():
    with_plan = sorted(t for t, fam in families().items() if fam.tp_plan is not None)
    assert with_plan == ["gemma3", "gemma3_text", "llama", "mistral", "mixtral", "qwen2", "qwen3",
                         "qwen3_moe"]
    cfg = load_config(None, ["data.path=x", "parallel.tp=2"])
    lay = resolve_layout(cfg.parallel, 2)
    _, neox = resolve_model_config("pythia-tiny")
    with pytest.raises(TunesmithError, match=r"plan for the Gemma / Llama / MoE family only \(gemma3, gemma3_text, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe\)"):
        check_run(cfg, lay, neox, "cpu")


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_names_and_gradients(mode):
    torch.manual_seed(0)
    plain, _, _ = tiny_model(seed=1)
    ckpt, _, _ = tiny_model(seed=1)
    assert apply_activation_checkpointing(ckpt, mode) == len(ckpt.layers)
    assert apply_activation_checkpointing(ckpt, mode) == 0  # idempotent: none wrapped twice
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    x = ids()
    for m in (plain, ckpt):
        m(x).float().square().mean().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_activation_checkpointing_every_k_blocks():
    model, _, _ = tiny_model()
    assert apply_activation_checkpointing(model, "full", every=2) == 1
    with pytest.raises(TunesmithError, match="must be one of"):
        apply_activation_checkpointing(model, "most")


@pytest.fixture
def one_rank_mesh():
    """A one-rank gloo group in this process (torn down after the test)."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
    finally:
        dist.destroy_process_group()


def test_llama_tp_plan_shards_every_planned_weight_and_keeps_logits(one_rank_mesh):
    ref, _, _ = tiny_model(seed=2)
    model, _, _ = tiny_model(seed=2)
    apply_tp(model, one_rank_mesh)
    block = model.layers[0]
    for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        assert isinstance(block.get_submodule(name).weight, DTensor), name
    assert isinstance(model.tok_embeddings.weight, DTensor)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_moe_tp_plan_splits_the_experts_and_keeps_logits(one_rank_mesh):
    """moe-tiny (a dense layer and a sparse one): the Llama plan on attention and the dense
    MLP, experts Shard(0) (whole experts per rank), the router a plain replicated weight."""
    from tunesmith.models import build_model, init_random

    family, cfg = resolve_model_config("moe-tiny", {"mlp_only_layers": [0]})
    ref = init_random(build_model(family, cfg, "meta"), "cpu", "float32", 5)
    model = init_random(build_model(family, cfg, "meta"), "cpu", "float32", 5)
    apply_tp(model, one_rank_mesh)
    dense, sparse = model.layers[0].feed_forward, model.layers[1].feed_forward
    assert isinstance(dense.w1.weight, DTensor)
    assert [p.placements for p in (sparse.experts.w13, sparse.experts.w2)] == [(Shard(0),)] * 2
    assert not isinstance(sparse.router.weight, DTensor)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    cfg_bad = load_config(None, ["data.path=x", "parallel.tp=2", "data.block_size=64"])
    _, odd = resolve_model_config("moe-tiny", {"num_experts": 5})
    with pytest.raises(TunesmithError, match="must divide the model's num_experts=5"):
        check_run(cfg_bad, resolve_layout(cfg_bad.parallel, 2), odd, "cpu")


def test_tp_refuses_a_family_without_a_plan(one_rank_mesh):
    from tunesmith.models import build_model

    family, cfg = resolve_model_config("gpt2-tiny")
    with pytest.raises(TunesmithError, match="no plan for the gpt2 family"):
        apply_tp(build_model(family, cfg, "meta"), one_rank_mesh)
