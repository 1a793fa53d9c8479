"""Evaluation by generation: answer held-out SFT prompts, score ROUGE / exact match, and write
the predictions as JSONL (`{"index", "where", "prompt", "reference", "prediction", scores}`).

Prompts are tokenized exactly as in training (the tokenizer's BOS where training had it, the
chat template's generation prompt for chats), decoded greedily (or sampled) with the KV cache,
and stopped at EOS or the template's end-of-turn token. One prompt at a time: simple and exact
(no padding), fine for the few hundred held-out examples evaluation uses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tunesmith.data.sft_data import special_prefix
from tunesmith.eval.rouge import corpus_scores, score_pair
from tunesmith.models.generate import generate

log = logging.getLogger("tunesmith")


def prompt_ids(tokenizer: Any, rendered: Any, max_len: int) -> list[int]:
    """Token ids of a rendered example's generation prompt, left-truncated to max_len."""
    ids = list(tokenizer(rendered.prompt, add_special_tokens=False)["input_ids"])
    prefix = special_prefix(tokenizer) if rendered.prefix else []
    keep = max(max_len - len(prefix), 1)
    return prefix + ids[-keep:]


def _generate_one(model: torch.nn.Module, ids: list[int], max_new: int, stop: list[int],
                  temperature: float, gen: torch.Generator | None) -> list[int]:
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)  # [1, T]
    out = generate(model, x, max_new_tokens=max_new, temperature=temperature,
                   eos_token_id=stop or None, generator=gen)
    new = out[0, len(ids):].tolist()
    for i, t in enumerate(new):  # cut at the first stop token (it and padding after it)
        if t in stop:
            return new[:i]
    return new


def evaluate_generation(
    model: torch.nn.Module, tokenizer: Any, items: Sequence[tuple[str, Any]], stop_ids: list[int],
    *, max_new_tokens: int, max_positions: int, out_path: str | Path | None,
    max_samples: int | None = None, temperature: float = 0.0, seed: int = 0,
    autocast: Any = None,
) -> dict[str, float]:
    """Generate for `items` [(where, Rendered)], return mean ROUGE-1/2/L F1 and exact match."""
    items = list(items)[:max_samples] if max_samples else list(items)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    preds: list[str] = []
    rows: list[dict[str, Any]] = []
    budget = max(max_positions - max_new_tokens, 1)
    for i, (where, rendered) in enumerate(items):
        ids = prompt_ids(tokenizer, rendered, budget)
        with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
            new = _generate_one(model, ids, max_new_tokens, stop_ids, temperature, gen)
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        preds.append(text)
        rows.append({"index": i, "where": where, "prompt": rendered.prompt,
                     "reference": rendered.reference, "prediction": text,
                     **score_pair(text, rendered.reference)})
    model.train(was_training)
    scores = corpus_scores(preds, [r.reference for _, r in items])
    if out_path is not None:
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
    log.info("generation eval on %d samples: %s", len(items), scores)
    return scores
