"""Parity on a real trained checkpoint (stories260K, a 260K-param Llama trained on TinyStories)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from tunesmith.models import build_model, load_pretrained, resolve_model_config
from tunesmith.models.generate import generate

MODEL_DIR = Path(__file__).resolve().parents[2].parent / "shared/data/models/stories260K/hf"

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(),
                       reason=f"stories260K checkpoint not found at {MODEL_DIR}"),
]


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    family, cfg = resolve_model_config(str(MODEL_DIR))
    ours = load_pretrained(build_model(family, cfg), str(MODEL_DIR), "cpu", torch.float32).eval()
    return hf, ours


def test_logits_match(models) -> None:
    hf, ours = models
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf.config.vocab_size, (2, 96), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_greedy_generation_matches(models) -> None:
    hf, ours = models
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    enc = tok("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        expected = hf.generate(**enc, max_new_tokens=60, do_sample=False,
                               pad_token_id=tok.eos_token_id)
    got = generate(ours, enc["input_ids"], max_new_tokens=60,
                   eos_token_id=ours.cfg.eos_token_id)
    assert got.tolist() == expected.tolist()
    assert got.shape[1] > enc["input_ids"].shape[1] + 10  # really generated a story
