"""A RoBERTa MLM run through our trainer and the same run through transformers (identical init,
identical dynamically masked batches of real text, AdamW, clipping, fp32) give the same loss
curve; plus the masking collator's statistics."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from tunesmith.config import RunConfig
from tunesmith.config.schema import DataConfig
from tunesmith.data import build_clm_datasets, load_tokenizer
from tunesmith.data.mlm import MaskingSpec, MLMCollator
from tunesmith.models import build_model, load_pretrained, resolve_model_config
from tunesmith.optim import build_scheduler
from tunesmith.runtime import resolve_runtime
from tunesmith.train.trainer import Trainer

STEPS = 8


@pytest.fixture(scope="module")
def mlm_tok(tiny_tokenizer_dir) -> Any:
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    tok.add_special_tokens({"mask_token": "<mask>"})
    return tok


def _batches(tok: Any, text_file, tmp_path) -> list[dict]:
    data = DataConfig(path=str(text_file), block_size=48, validation_split_percentage=0,
                      cache_dir=str(tmp_path / "cache"))
    ds, _ = build_clm_datasets(data, tok, seed=0, max_positions=64)
    collate = MLMCollator(MaskingSpec.from_tokenizer(tok), seed=3)
    rows = [ds[i] for i in range(STEPS * 4)]
    return [collate(rows[i * 4 : (i + 1) * 4]) for i in range(STEPS)]


def _trainer(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Trainer:
    cfg = RunConfig.model_validate({"task": "mlm", "data": {"path": "x"},
                                    "train": {"precision": "fp32", "max_grad_norm": 1.0},
                                    "schedule": {"name": "constant"}})
    return Trainer(cfg=cfg, rt=resolve_runtime("cpu", "fp32"), model=model, optimizer=opt,
                   scheduler=build_scheduler(opt, cfg.schedule, STEPS, STEPS),
                   train_loader=None, val_loader=None, out_dir=None, total_steps=STEPS,
                   steps_per_epoch=STEPS, flops_per_token=1.0, peak_tflops=None)


def test_roberta_mlm_loss_curve_matches_transformers(mlm_tok, demo_text, tmp_path) -> None:
    cfg = transformers.RobertaConfig(
        vocab_size=len(mlm_tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=66, pad_token_id=mlm_tok.pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = transformers.RobertaForMaskedLM(cfg)
    hf.save_pretrained(tmp_path / "init")
    family, ours_cfg = resolve_model_config(str(tmp_path / "init"))
    ours = load_pretrained(build_model(family, ours_cfg), str(tmp_path / "init"), "cpu",
                           torch.float32)
    batches = _batches(mlm_tok, demo_text[0], tmp_path)
    assert all(int((b["labels"] != -100).sum()) > 0 for b in batches)

    def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), eps=1e-6,
                                 weight_decay=0.0)

    trainer = _trainer(ours, adamw(ours))
    ours_curve = [float(trainer.train_step([b])[0]) for b in batches]

    hf.train()
    opt = adamw(hf)
    hf_curve = []
    for b in batches:
        loss = hf(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"),
                  labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hf_curve.append(float(loss.detach()))
    assert ours_curve == pytest.approx(hf_curve, rel=2e-4)
    assert ours_curve[-1] < ours_curve[0] - 0.1  # it learns


def test_masking_statistics_and_determinism(mlm_tok) -> None:
    spec = MaskingSpec.from_tokenizer(mlm_tok, whole_word=True)
    ids = torch.randint(5, len(mlm_tok) - 1, (64, 128), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = mlm_tok.pad_token_id  # special tokens are never selected
    rows = [{"input_ids": r} for r in ids]
    out = MLMCollator(spec, seed=1)(rows)
    chosen = out["labels"] != -100
    assert not bool(chosen[:, 0].any())
    assert 0.13 < float(chosen[:, 1:].float().mean()) < 0.17
    masked = out["input_ids"] == spec.mask_token_id
    assert 0.75 < float(masked[chosen].float().mean()) < 0.85
    unchanged = (out["input_ids"] == ids) & chosen
    assert 0.06 < float(unchanged.float().sum() / chosen.sum()) < 0.14
    assert torch.equal(MLMCollator(spec, seed=1)(rows)["labels"], out["labels"])
    whole = MLMCollator(spec, seed=1, whole_word=True)(rows)["labels"] != -100
    cont = spec.continues_word[ids]
    # A selected continuation token always comes with the token before it (same word).
    follow = whole[:, 1:] & cont[:, 1:]
    assert bool((whole[:, :-1][follow]).all()) and 0.05 < float(whole.float().mean()) < 0.4
