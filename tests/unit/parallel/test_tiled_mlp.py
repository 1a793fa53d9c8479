"""Sequence-tiled MLP (`parallel.mlp_chunk_size`): the same losses and gradients as the plain
MLP (alone, under full activation checkpointing, with activation offload's hooks, with LoRA), a
smaller saved-activation footprint, and a clear refusal for models without a native MLP."""

from __future__ import annotations

import pytest
import torch

from tests.peft_utils import batch, tiny_model
from tunesmith.errors import TunesmithError
from tunesmith.parallel import apply_activation_checkpointing
from tunesmith.parallel.offload import apply_activation_offload
from tunesmith.parallel.tiled_mlp import apply_tiled_mlp


def _grads(model, data):
    model.zero_grad(set_to_none=True)
    logits = model(data["input_ids"])  # [B, T, V]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data["labels"].flatten(), ignore_index=-100)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ac, offload", [("none", False), ("full", False), ("full", True)])
def test_tiled_mlp_gives_the_plain_gradients(ac, offload):
    data = batch(5, t=24)
    ref_model = tiny_model(seed=2)[0].double()
    apply_activation_checkpointing(ref_model, ac)
    ref_loss, ref = _grads(ref_model, data)
    model = tiny_model(seed=2)[0].double()
    assert apply_tiled_mlp(model, 7) == len(model.layers)  # 24 positions: chunks 7, 7, 7, 3
    apply_activation_checkpointing(model, ac)
    if offload:
        apply_activation_offload(model, torch.device("cpu"), force=True, min_bytes=0)
    loss, got = _grads(model, data)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert got.keys() == ref.keys()
    for name in ref:  # weight gradients add chunk by chunk: fp64 summation order only
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_tiled_mlp_saves_one_chunk_of_intermediates():
    """What autograd keeps after forward: the plain MLP saves its [B, T, ffn] intermediates; the
    tiled one only each chunk's input (the chunk checkpoints recompute the rest)."""
    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.layers[0].feed_forward(torch.randn(4, 24, model.cfg.dim))
        return total

    plain = tiny_model(seed=2)[0]
    tiled = tiny_model(seed=2)[0]
    apply_tiled_mlp(tiled, 8)
    for m in (plain, tiled):
        m.layers[0].feed_forward.requires_grad_(True)
    assert saved_bytes(tiled) < saved_bytes(plain) / 2


def test_eval_and_short_rows_run_the_plain_mlp():
    model = tiny_model(seed=2)[0]
    ff = model.layers[0].feed_forward
    x = torch.randn(2, 5, model.cfg.dim)
    with torch.no_grad():
        before = ff(x)
    apply_tiled_mlp(model, 8)
    with torch.no_grad():
        assert torch.equal(ff(x), before)
    apply_tiled_mlp(model, 8)  # idempotent: wrapped once
    assert ff.forward.__wrapped__.__self__ is ff


def test_models_without_a_native_mlp_are_refused():
    with pytest.raises(TunesmithError, match="parallel.mlp_chunk_size needs a natively implemented family"):
        apply_tiled_mlp(torch.nn.Sequential(torch.nn.Linear(4, 4)), 8)
    assert apply_tiled_mlp(torch.nn.Sequential(), None) == 0  # off: nothing asked, nothing checked


def test_config_rejects_a_non_positive_chunk():
    from tunesmith.config.schema import RunConfig

    with pytest.raises(Exception, match="mlp_chunk_size"):
        RunConfig.model_validate({"data": {"path": "x"}, "parallel": {"mlp_chunk_size": 0}})
    assert RunConfig.model_validate({"data": {"path": "x"}, "parallel": {"mlp_chunk_size": 4096}}).parallel.mlp_chunk_size == 4096


def test_a_generic_transformers_model_is_refused_before_any_work():
    """The generic wrapper's blocks are transformers' own: refused by the run checks (one line,
    before any process group or model build), not at parallelize time."""
    from types import SimpleNamespace

    from tunesmith.config import load_config
    from tunesmith.parallel.layout import check_run, resolve_layout

    cfg = load_config(None, ["data.path=x", "parallel.mlp_chunk_size=4096"])
    with pytest.raises(TunesmithError, match="needs a natively implemented family.*'opt'"):
        check_run(cfg, resolve_layout(cfg.parallel, 1), SimpleNamespace(model_type="opt"), "cpu")
    from tunesmith.models import resolve_model_config

    _, llama = resolve_model_config("tiny")
    check_run(cfg, resolve_layout(cfg.parallel, 1), llama, "cpu")  # native: fine
