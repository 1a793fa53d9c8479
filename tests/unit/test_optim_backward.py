"""optim.in_backward: the optimizer step fused into backward. Same updates as the plain step
(no clipping), whole-model gradients never coexist, the grad norm still reaches the trainer,
and the combinations that cannot work are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.peft_utils import ids, tiny_model
from tunesmith.config import load_config
from tunesmith.config.schema import OptimConfig
from tunesmith.errors import ConfigError
from tunesmith.objective.loss import linear_cross_entropy
from tunesmith.optim import build_optimizer


def _loss(model, x):
    hidden = model(x, return_hidden=True)  # [B, T, D]
    return linear_cross_entropy(hidden[:, :-1], model.output.weight, x[:, 1:]) / x.numel()


def _train(in_backward: bool, steps: int = 3, **optim):
    model, _, _ = tiny_model(seed=1)
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1, in_backward=in_backward, **optim),
                          torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))  # lr changes every step
    norms = []
    for s in range(steps):
        _loss(model, ids(2, 12, seed=s)).backward()
        if in_backward:
            assert all(p.grad is None for p in model.parameters())  # freed as they were applied
            norms.append(opt.in_backward.grad_norms()[0])
        else:
            norms.append(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()])))
        opt.step()  # a no-op under in_backward: every gradient is already None
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model, opt, norms


def test_same_updates_and_state_as_the_plain_step():
    ref, ref_opt, ref_norms = _train(False)
    got, opt, norms = _train(True)
    for (n, a), b in zip(ref.named_parameters(), got.parameters()):
        assert torch.equal(a, b), n
    for a, b in zip(ref_norms, norms):
        assert torch.allclose(a, b, rtol=1e-5)
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()  # what checkpoints save: same format
    assert sd["param_groups"] == ref_sd["param_groups"]
    for k, st in ref_sd["state"].items():
        assert all(torch.equal(st[f], sd["state"][k][f]) for f in st), k


def test_whole_model_gradients_never_coexist():
    model, _, _ = tiny_model(seed=1)
    build_optimizer(model, OptimConfig(in_backward=True), torch.device("cpu"))
    params = list(model.parameters())
    alive = []
    for p in params:  # registered after tunesmith's hooks: runs once p was stepped
        p.register_post_accumulate_grad_hook(
            lambda _: alive.append(sum(q.grad is not None for q in params)))
    _loss(model, ids(2, 12)).backward()
    assert len(alive) == len(params) and max(alive) == 0


def _loaded(in_backward: bool, sd: dict):
    model, _, _ = tiny_model(seed=1)
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1, in_backward=in_backward),
                          torch.device("cpu"))
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # writes lr into the groups it sees
    opt.load_state_dict(copy.deepcopy(sd))  # resume: new state and group dicts (the saved lr)
    opt.param_groups[0]["lr"] = 3e-3  # the scheduler's next write goes to the new groups
    _loss(model, ids(2, 12)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def test_after_load_state_dict_the_hooks_use_the_loaded_state_and_groups():
    _, opt, _ = _train(True, steps=1)
    sd = opt.state_dict()
    ref, _ = _loaded(False, sd)
    got, fresh = _loaded(True, sd)
    assert {int(st["step"]) for st in fresh.state.values()} == {2}
    for (n, a), b in zip(ref.named_parameters(), got.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("extra, message", [
    ([], "optim.in_backward needs train.max_grad_norm=null"),
    (["train.max_grad_norm=null", "train.grad_accum_steps=2"], "optim.in_backward needs train.grad_accum_steps=1"),
    (["train.max_grad_norm=null", "train.nan_policy=skip"], "optim.in_backward needs train.nan_policy=halt"),
    (["train.max_grad_norm=null", "train.precision=fp16"], "optim.in_backward does not work with train.precision=fp16"),
])
def test_refused_combinations(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.path=x", "optim.in_backward=true", *extra])
