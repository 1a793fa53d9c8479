"""train.compile_options: TorchInductor options for the compiled blocks, checked up front, and
a block compiled with them computes what the eager block does (loss and gradients)."""

from __future__ import annotations

import pytest
import torch

from tunesmith.build import assemble
from tunesmith.config.resolve import build_config
from tunesmith.errors import ConfigError
from tunesmith.objective.forward import batch_loss_sum
from tunesmith.parallel.apply import inductor_options


def _cfg(**train):
    return build_config({"model": {"name": "tiny"}, "data": {"path": "synthetic", "block_size": 16},
                         "train": {"device": "cpu", "precision": "fp32", "seed": 3, **train}})


def test_unknown_option_is_one_clear_error():
    assert inductor_options({}) is None
    assert inductor_options({"coordinate_descent_tuning": True}) == {"coordinate_descent_tuning": True}
    with pytest.raises(ConfigError, match=r"'coordinate_descent_tunin' is not a TorchInductor "
                                          r"option \(did you mean 'coordinate_descent_tuning'\?\)"):
        assemble(_cfg(compile=True, compile_options={"coordinate_descent_tunin": True}),
                 with_tokenizer=False)


def _loss_and_grads(cfg):
    a = assemble(cfg, with_tokenizer=False)
    model, rt = a.need("model"), a.need("rt")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=g)
    loss = batch_loss_sum(model, {"input_ids": ids, "labels": ids}, rt)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_with_options_matches_eager():
    try:
        torch.compile(lambda t: t.sin() + 1)(torch.ones(4))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torch.compile does not work on this CPU: {type(e).__name__}: {str(e)[:200]}")
    torch._dynamo.reset()
    ref_loss, ref_grads = _loss_and_grads(_cfg())
    opts = {"epilogue_fusion": False, "max_autotune_pointwise": False}
    loss, grads = _loss_and_grads(_cfg(compile=True, compile_options=opts))
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    for n, g in ref_grads.items():
        assert torch.allclose(grads[n], g, rtol=1e-4, atol=1e-6), n
