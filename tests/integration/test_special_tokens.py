"""Special-token ids of a saved model come from the tokenizer it was trained with."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.conftest import REPO, shared_path
from tunesmith.cli.main import run


def test_preset_with_llama3_tokenizer_saves_tokenizer_ids(tmp_path, caplog):
    """`model.name=tiny` (bos 1, eos 2) with the Llama 3 tokenizer, as two shipped recipes do:
    the saved config.json / generation_config.json carry the tokenizer's ids, and
    `transformers.generate` stops at the tokenizer's EOS, not at id 2 (`#` in Llama 3)."""
    tok_dir = shared_path("tokenizers", "llama3", "hf")
    transformers = pytest.importorskip("transformers")
    data = REPO / "recipes" / "data" / "quotes_sample.jsonl"
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="tunesmith")
    code = run(["train", "model.name=tiny", f"model.tokenizer={tok_dir}",
                ("model.overrides={vocab_size: 128256, dim: 32, n_layers: 1, n_heads: 2, "
                 "n_kv_heads: 1, intermediate_size: 64, max_position_embeddings: 128}"),
                f"data.path={data}", "data.text_column=quote", "data.block_size=32",
                "train.micro_batch_size=2", "schedule.warmup_steps=0",
                "data.validation_split_percentage=0",
                "train.max_steps=1", "train.precision=fp32", "logging.progress=false",
                "eval.at_end=false", f"output.dir={out}"])
    assert code == 0
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert (bos, eos) == (128000, 128001) and tok.convert_ids_to_tokens(2) == "#"
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    gen_config = json.loads((final / "generation_config.json").read_text())
    for c in (config, gen_config):
        assert (c["bos_token_id"], c["eos_token_id"]) == (bos, eos)
    assert "the tokenizer's ids are used and saved" in caplog.text

    model = transformers.AutoModelForCausalLM.from_pretrained(final)
    assert model.generation_config.eos_token_id == eos

    class Script(transformers.LogitsProcessor):
        """Forces `#`, `#`, EOS, `#`...: only the saved EOS id may end the generation."""

        def __init__(self, start: int) -> None:
            self.start, self.plan = start, [2, 2, eos, 2, 2, 2]

        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -1e9)
            forced[:, self.plan[input_ids.shape[1] - self.start]] = 0.0
            return forced

    prompt = tok("Hello there", return_tensors="pt")
    n = prompt["input_ids"].shape[1]
    out_ids = model.generate(**prompt, max_new_tokens=6, do_sample=False,
                             logits_processor=transformers.LogitsProcessorList([Script(n)]))
    assert out_ids[0, n:].tolist() == [2, 2, eos]  # went past `#`, stopped at the tokenizer's EOS


def test_agreeing_ids_are_kept():
    from types import SimpleNamespace

    from tunesmith.build.special_tokens import align_special_tokens
    from tunesmith.models import resolve_model_config

    _, cfg = resolve_model_config("tiny")
    tok = SimpleNamespace(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                          pad_token_id=None)
    assert align_special_tokens(cfg, tok, "t") is cfg
    several = type(cfg)(**{**cfg.__dict__, "eos_token_id": [5, 2, 7]})
    assert align_special_tokens(several, tok, "t") is several  # the tokenizer's EOS is among them
    other = SimpleNamespace(bos_token_id=9, eos_token_id=10, pad_token_id=11)
    moved = align_special_tokens(cfg, other, "t")
    assert (moved.bos_token_id, moved.eos_token_id) == (9, 10)
