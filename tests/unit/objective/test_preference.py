"""Preference objectives (task=dpo): per-row log-probs against transformers, the DPO / cDPO /
IPO / SimPO losses against their papers' formulas written out independently here, the LoRA
reference (adapters switched off) against the base model, and the objective's bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from tests.peft_utils import VOCAB, save_base, tiny_model
from tunesmith.config.tasks import DPOConfig
from tunesmith.errors import TunesmithError
from tunesmith.objective.preference import PreferenceObjective, evaluate_preferences, pair_losses, row_logps
from tunesmith.peft import LoRALinear, LoRASpec, adapters_disabled, apply_lora
from tunesmith.runtime import resolve_runtime

RT = resolve_runtime("cpu", "fp32")


def _pair_batch(seed: int = 0, pairs: int = 2, t: int = 20) -> dict[str, torch.Tensor]:
    """Interleaved rows (chosen, rejected) sharing a prompt, right-padded, labels shifted with
    -100 on the prompt and the padding (the data pipeline's contract)."""
    g = torch.Generator().manual_seed(seed)
    rows, labels, masks = [], [], []
    for _ in range(pairs):
        prompt = torch.randint(0, VOCAB, (6,), generator=g)
        for length in (int(torch.randint(4, t - 6, (1,), generator=g)), int(torch.randint(4, t - 6, (1,), generator=g))):
            seq = torch.cat([prompt, torch.randint(0, VOCAB, (length,), generator=g)])
            pad = t - seq.numel()
            ids = torch.cat([seq, torch.zeros(pad, dtype=torch.long)])
            lab = torch.full((t,), -100)
            lab[5:seq.numel() - 1] = seq[6:]  # targets: the answer tokens, predicted from t - 1
            rows.append(ids), labels.append(lab)
            masks.append(torch.cat([torch.ones(seq.numel()), torch.zeros(pad)]).long())
    return {"input_ids": torch.stack(rows), "labels": torch.stack(labels), "attention_mask": torch.stack(masks)}


def test_row_logps_match_transformers(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    path = save_base(tmp_path, seed=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    from tests.peft_utils import load_ours

    ours, _, _ = load_ours(path)
    batch = _pair_batch(seed=3)
    logp, counts = row_logps(ours, batch, RT, need_grad=False)
    with torch.no_grad():
        logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lab = batch["labels"]
    tok = torch.log_softmax(logits.float(), -1).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    ref = (tok * (lab != -100)).sum(1)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == (lab != -100).sum(1).tolist()


def _reference_losses(loss: str, beta: float, eps: float, gamma: float, pc, pr, rc, rr, nc, nr):
    """The papers' per-pair losses, one pair at a time with math (no torch ops shared with ours)."""
    out = []
    for i in range(len(pc)):
        if loss == "simpo":  # SimPO eq. 6
            z = beta * pc[i] / nc[i] - beta * pr[i] / nr[i] - gamma
            out.append(math.log1p(math.exp(-z)))
        elif loss == "orpo":  # ORPO eqs. 4-6: NLL of the chosen answer + lambda * L_OR
            p_c, p_r = math.exp(pc[i] / nc[i]), math.exp(pr[i] / nr[i])
            z = math.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
            out.append(-pc[i] / nc[i] + beta * math.log1p(math.exp(-z)))
        elif loss == "ipo":  # IPO eq. 17, per-token log-ratios as TRL
            h = (pc[i] - rc[i]) / nc[i] - (pr[i] - rr[i]) / nr[i]
            out.append((h - 1 / (2 * beta)) ** 2)
        else:  # DPO eq. 7; conservative DPO mixes in the flipped label with weight eps
            z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
            out.append((1 - eps) * math.log1p(math.exp(-z)) + eps * math.log1p(math.exp(z)))
    return out


@pytest.mark.parametrize("loss,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("simpo", 0.0),
                                      ("orpo", 0.0)])
def test_pair_losses_match_the_formulas(loss, eps) -> None:
    g = torch.Generator().manual_seed(7)
    logp = -torch.rand(8, generator=g, dtype=torch.float64) * 30  # 4 pairs
    ref = logp + torch.randn(8, generator=g, dtype=torch.float64)
    counts = torch.tensor([5, 9, 3, 12, 7, 7, 1, 20])
    gamma = {"simpo_gamma": 0.4} if loss == "simpo" else {}  # refused with the other losses
    cfg = DPOConfig(loss=loss, beta=0.3, label_smoothing=eps, **gamma)
    losses, chosen, rejected = pair_losses(cfg, logp, ref, counts)
    p, r, n = logp.tolist(), ref.tolist(), counts.tolist()
    expected = _reference_losses(loss, 0.3, eps, 0.4, p[0::2], p[1::2], r[0::2], r[1::2], n[0::2], n[1::2])
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    if loss in ("simpo", "orpo"):
        torch.testing.assert_close(chosen, 0.3 * logp[0::2] / counts[0::2])
    else:
        torch.testing.assert_close(chosen, 0.3 * (logp[0::2] - ref[0::2]))
        torch.testing.assert_close(rejected, 0.3 * (logp[1::2] - ref[1::2]))


def test_dpo_at_the_reference_is_log2_and_pushes_chosen_up() -> None:
    logp = torch.tensor([-10.0, -12.0], requires_grad=True)
    losses, _, _ = pair_losses(DPOConfig(), logp, logp.detach(), torch.tensor([4, 4]))
    assert losses.item() == pytest.approx(math.log(2))
    losses.sum().backward()
    assert logp.grad[0] < 0 < logp.grad[1]  # descent raises the chosen, lowers the rejected


def _lora_model(seed: int = 2):
    model, family, cfg = tiny_model(seed=seed)
    apply_lora(model, family.adapter(cfg), LoRASpec(r=4, alpha=8), ["wq", "wk", "wv", "w1", "w3"])
    with torch.no_grad():  # B = 0 at init would make the check vacuous
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    return model


def test_adapters_disabled_is_the_base_model() -> None:
    base, _, _ = tiny_model(seed=2)
    lora = _lora_model(seed=2)
    x = _pair_batch(seed=1)["input_ids"]
    with torch.no_grad():
        want, adapted = base(x), lora(x)
        with adapters_disabled(lora):
            got = lora(x)
        after = lora(x)
    assert not torch.allclose(adapted, want, atol=1e-3)  # the adapters do change the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, adapted)  # switched back on afterwards
    assert all(m.adapters_on for m in lora.modules() if isinstance(m, LoRALinear))


def test_objective_counts_pairs_and_logs_reward_means() -> None:
    lora = _lora_model(seed=2)
    obj = PreferenceObjective(DPOConfig(beta=0.5), adapters_off=lambda: adapters_disabled(lora))
    batch = _pair_batch(seed=4, pairs=3)
    assert obj.count(lora, batch) == 3
    loss_sum = obj.loss_sum(lora, batch, RT)
    loss_sum.backward()
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)
    logp = row_logps(lora, batch, RT, need_grad=False)[0]
    with adapters_disabled(lora):
        ref = row_logps(lora, batch, RT, need_grad=False)[0]
    chosen, rejected = 0.5 * (logp[0::2] - ref[0::2]), 0.5 * (logp[1::2] - ref[1::2])
    fields = obj.log_fields()
    assert fields["rewards_chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5)
    assert fields["reward_margin"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-5, abs=1e-6)
    assert fields["reward_accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    assert obj.log_fields() == {}  # read once, then reset
    ev = evaluate_preferences(obj, lora, [batch], RT)
    assert ev["eval_pairs"] == 3 and ev["eval_loss"] == pytest.approx(loss_sum.item() / 3, rel=1e-5)


def test_reference_losses_need_a_reference() -> None:
    with pytest.raises(ValueError, match="needs a reference"):
        PreferenceObjective(DPOConfig(loss="ipo"))
    PreferenceObjective(DPOConfig(loss="simpo"))  # reference-free
    PreferenceObjective(DPOConfig(loss="orpo"))


def test_right_padding_runs_as_plain_causal_attention_with_the_same_scores() -> None:
    from tests.peft_utils import tiny_model
    from tunesmith.objective.forward import batch_loss_sum

    model, _, _ = tiny_model(seed=6)
    batch = _pair_batch(seed=8, pairs=2)
    assert (batch["attention_mask"] == 0).any()  # the rows really are padded
    logp, _ = row_logps(model, batch, RT, need_grad=False)
    # The padding-mask path (the token objective keeps the mask) gives the same total.
    total = batch_loss_sum(model, batch, RT, need_grad=False)
    torch.testing.assert_close(-logp.sum(), total, rtol=1e-5, atol=1e-4)


def test_reference_table_keys_rows_by_content_not_padding() -> None:
    """dpo.precompute_reference looks rows up by their real tokens and labels: the same pair
    padded to another length, or batched with other pairs, finds the same keys; another answer
    does not."""
    from tunesmith.data.preference import PairCollator
    from tunesmith.objective.reference_table import ReferenceTable, row_keys

    def pair(answer: list[int]) -> dict:
        return {"chosen": {"input_ids": [5, 6, *answer], "loss_mask": [False, False] + [True] * len(answer)},
                "rejected": {"input_ids": [5, 6, 9], "loss_mask": [False, False, True]}}

    alone = PairCollator(0)([pair([7, 8])])
    padded = PairCollator(0, 64)([pair([7, 8])])
    batched = PairCollator(0)([pair([1, 2, 3, 4]), pair([7, 8])])
    assert alone["input_ids"].shape[1] != padded["input_ids"].shape[1]
    assert row_keys(alone) == row_keys(padded) == row_keys(batched)[2:]
    assert len(set(row_keys(batched))) == 3  # two chosen answers differ; the rejected rows agree
    table = ReferenceTable(dict(zip(row_keys(alone), [-1.5, -2.5], strict=True)))
    assert table.lookup(padded, torch.device("cpu")).tolist() == [-1.5, -2.5]
    with pytest.raises(TunesmithError, match="was not scored before training"):
        table.lookup(PairCollator(0)([pair([1, 2, 3, 4])]), torch.device("cpu"))
