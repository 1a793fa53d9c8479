"""The MoE load-balancing loss in training (`RouterAuxObjective`): one micro-batch gives HF's
loss (output_router_logits=True), and two accumulated micro-batches give the gradient of the
documented loss, CE over the step's targets + coef x the mean of the micro-batches' aux losses,
with the reference written with transformers' own forward passes."""

from __future__ import annotations

import copy

import pytest
import torch

from tunesmith.models import build_model, load_pretrained, resolve_model_config
from tunesmith.models.moe.adapter import MoEStateDictAdapter
from tunesmith.objective.loss import IGNORE_INDEX
from tunesmith.objective.router_aux import RouterAuxObjective
from tunesmith.runtime import resolve_runtime

transformers = pytest.importorskip("transformers")
RT = resolve_runtime("cpu", "fp32")
VOCAB, COEF = 64, 0.05


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
        router_aux_loss_coef=COEF)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("qwen3_moe")
    hf.save_pretrained(path)
    family, ours_cfg = resolve_model_config(str(path))
    ours = load_pretrained(build_model(family, ours_cfg), str(path), "cpu", torch.float32)
    return hf, ours


def _batch(seed: int, rows: int = 2, t: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, t), generator=torch.Generator().manual_seed(seed))
    labels = torch.cat([ids[:, 1:], torch.full((rows, 1), IGNORE_INDEX)], dim=1)  # shifted
    return {"input_ids": ids, "labels": labels}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_one_micro_batch_is_hf_loss(models) -> None:
    hf, ours = models
    batch = _batch(0)
    obj = RouterAuxObjective(COEF)
    n = int((batch["labels"] != IGNORE_INDEX).sum())
    loss = obj.loss_sum(ours, batch, RT) / n
    ref = hf(batch["input_ids"], labels=batch["input_ids"], output_router_logits=True)
    assert ref.aux_loss > 0
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=0)
    logged = obj.log_fields()
    assert logged["router_aux_loss"] == pytest.approx(ref.aux_loss.item(), rel=1e-5)
    assert obj.log_fields() == {}  # reset after each record


def test_two_micro_batches_accumulate_as_documented(models) -> None:
    hf, ours = models
    mbs = [_batch(1), _batch(2)]
    n_total = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in mbs)
    obj = RouterAuxObjective(COEF)
    ours.zero_grad()
    for mb in mbs:  # the trainer's arithmetic: each micro-batch's sum over the step's count
        (obj.loss_sum(ours, mb, RT) / n_total).backward()
    got = _grads(ours)
    # Reference: summed CE over the step's targets / count, plus coef x the mean of the two
    # micro-batches' aux losses (equal target counts), every term from transformers.
    hf.zero_grad()
    ce_sum, aux = 0.0, []
    for mb in mbs:
        out = hf(mb["input_ids"], output_router_logits=True)
        logits = out.logits.reshape(-1, VOCAB)
        ce_sum = ce_sum + torch.nn.functional.cross_entropy(
            logits, mb["labels"].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        aux.append(out.aux_loss)
    (ce_sum / n_total + COEF * (aux[0] + aux[1]) / 2).backward()
    adapter = MoEStateDictAdapter(ours.cfg)
    for hf_name, p in hf.named_parameters():
        native = adapter.hf_key_to_native(hf_name)
        torch.testing.assert_close(got[native], p.grad, atol=1e-6, rtol=1e-4, msg=hf_name)
    assert obj.log_fields()["router_aux_loss"] == pytest.approx((sum(aux) / 2).item(), rel=1e-5)


def test_recompute_in_backward_keeps_no_routing(models) -> None:
    """Under activation checkpointing the blocks run again in backward; the routing is kept for
    the objective's forward only, so nothing of the recompute stays referenced afterwards."""
    from tunesmith.parallel.ac import apply_activation_checkpointing

    _, ours = models
    ref = RouterAuxObjective(COEF)
    ours.zero_grad()
    (ref.loss_sum(ours, _batch(3), RT) / 22).backward()
    want = _grads(ours)
    model = copy.deepcopy(ours)
    assert apply_activation_checkpointing(model, "full") == len(model.layers)
    model.zero_grad()
    obj = RouterAuxObjective(COEF)
    (obj.loss_sum(model, _batch(3), RT) / 22).backward()
    assert all(m.router_stats is None for m in model.sparse_blocks())
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want[name.replace("._checkpoint_wrapped_module", "")], atol=1e-6, rtol=1e-5)
    assert obj.log_fields() == ref.log_fields()
