"""float8 MoE experts (transforms/float8_experts.py) on CPU: the padding of expert row blocks
to multiples of 16 (exact against the per-expert loop, forward and backward, with an exact
grouped GEMM in the float8 GEMM's place: float8 grouped GEMMs run only on Hopper), which
sparse layers convert, and when the transform leaves the experts bf16. The float8 numerics and
speed on a GPU: benchmarks/moe_float8_device.py."""

from __future__ import annotations

import logging

import pytest
import torch

from tunesmith.config.schema import RunConfig
from tunesmith.models import build_model, init_random, resolve_model_config
from tunesmith.models.moe import model as moe_model
from tunesmith.models.moe.model import Experts
from tunesmith.transforms.float8 import _expert_targets
from tunesmith.transforms.float8_experts import (
    ALIGN,
    Float8Experts,
    convert_float8_experts,
    float8_expert_targets,
    pad_groups,
)


def _exact_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, in] in blocks ending at offs [E] times w[e]^T [in, out] -> [M, out], in fp32."""
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(x[start:end] @ w[e].to(x.dtype).T)
        start = end
    return torch.cat(out)


class _ExactFloat8Experts(Float8Experts):
    grouped_mm = staticmethod(_exact_grouped_mm)


@pytest.mark.parametrize("counts", [[5, 0, 17, 16, 1, 0, 3, 30], [0, 0, 0, 8], [16, 32]])
def test_pad_groups_places_each_expert_on_a_16_row_boundary(counts: list[int]) -> None:
    counts_t = torch.tensor(counts)
    xs = torch.randn(int(counts_t.sum()), 4)
    buf, offs, dest = pad_groups(xs, counts_t)
    n_rows, n_exp = xs.shape[0], len(counts)
    assert buf.shape[0] % ALIGN == 0 and buf.shape[0] >= n_rows + ALIGN * n_exp
    assert offs.dtype == torch.int32 and int(offs[-1]) == buf.shape[0]
    assert all(int(o) % ALIGN == 0 for o in offs) and bool((offs[1:] >= offs[:-1]).all())
    torch.testing.assert_close(buf[dest], xs, rtol=0, atol=0)
    mask = torch.ones(buf.shape[0], dtype=torch.bool)
    mask[dest] = False
    assert bool((buf[mask] == 0).all())  # every other row is an exact zero
    starts = torch.cat([offs.new_zeros(1), offs[:-1]]).tolist()
    first = 0
    for e, c in enumerate(counts):  # expert e's rows open its block, in order
        assert dest[first:first + c].tolist() == list(range(starts[e], starts[e] + c))
        first += c


def _moe(overrides: dict | None = None):
    family, cfg = resolve_model_config("moe-tiny", {"n_layers": 2, **(overrides or {})})
    return init_random(build_model(family, cfg, "meta"), "cpu", torch.float32, seed=0)


def test_padded_blocks_reproduce_the_per_expert_loop() -> None:
    model = _moe()
    ref = model.layers[0].feed_forward.experts
    padded = _ExactFloat8Experts.__new__(_ExactFloat8Experts)
    padded.__dict__.update(ref.__dict__)  # the same Parameters
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, ref.w13.shape[2], generator=g, requires_grad=True)  # [N, D]
    experts = torch.randint(0, ref.w13.shape[0], (40, 2), generator=g)  # [N, k]
    weights = torch.rand(40, 2, generator=g)

    def run(mod: Experts, backend: str):
        moe_model.set_expert_backend(backend)
        try:
            out = mod(x, weights, experts)
        finally:
            moe_model.set_expert_backend("auto")
        grads = torch.autograd.grad(out.square().sum(), [x, mod.w13, mod.w2])
        return out, grads

    out_ref, grads_ref = run(ref, "loop")
    out, grads = run(padded, "grouped")  # the grouped path: padding + the (exact) grouped GEMM
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_rule_picks_plain_experts_with_16_multiple_dims() -> None:
    model = _moe()
    names = float8_expert_targets(model)
    assert names == ["layers.0.feed_forward.experts", "layers.1.feed_forward.experts"]
    assert float8_expert_targets(model, ["*.experts"]) == []
    assert float8_expert_targets(model, ["layers.0.*"]) == ["layers.1.feed_forward.experts"]
    assert float8_expert_targets(_moe({"moe_intermediate_size": 24})) == []  # 24 % 16
    convert_float8_experts(model, names[:1])
    assert type(model.layers[0].feed_forward.experts) is Float8Experts
    assert type(model.layers[1].feed_forward.experts) is Experts
    assert float8_expert_targets(model) == ["layers.1.feed_forward.experts"]  # converted ones: no


def _cfg(**parallel) -> RunConfig:
    return RunConfig.model_validate({"model": {"name": "moe-tiny"}, "data": {"path": "synthetic"},
                                     "train": {"float8": "rowwise"}, "parallel": parallel})


def _kept_bf16_because(cfg: RunConfig, caplog) -> str:
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        assert _expert_targets(_moe(), cfg) == []
    return caplog.text


def test_experts_stay_bf16_under_expert_parallelism(caplog) -> None:
    assert "the MoE experts stay bf16 (parallel.ep splits them)" in _kept_bf16_because(_cfg(ep=2), caplog)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-Hopper case needs a machine without a GPU")
def test_experts_stay_bf16_without_a_hopper_gpu(caplog) -> None:
    assert "needs a Hopper GPU (SM 9.0)" in _kept_bf16_because(_cfg(), caplog)
