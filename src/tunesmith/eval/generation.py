"""Evaluation by generation: answer held-out SFT prompts, score ROUGE / exact match, and write
the predictions as JSONL (`{"index", "where", "prompt", "reference", "prediction", scores}`).

Prompts are tokenized exactly as in training (the tokenizer's BOS where training had it, the
chat template's generation prompt for chats), decoded greedily (or sampled) over a static KV
cache, and stopped at EOS or the template's end-of-turn token. Prompts run in batches,
left-padded and sorted longest first (less padding); a padded row computes what the prompt
alone would, so greedy answers do not depend on the batch size. On CUDA each decode step is a
CUDA-graph replay (`cuda_graphs`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tunesmith.data.sft_data import special_prefix
from tunesmith.eval.rouge import corpus_scores, score_pair
from tunesmith.hf.files import write_text_atomic
from tunesmith.models.generate import generate, left_pad

log = logging.getLogger("tunesmith")


def prompt_ids(tokenizer: Any, rendered: Any, max_len: int) -> list[int]:
    """Token ids of a rendered example's generation prompt, left-truncated to max_len."""
    ids = list(tokenizer(rendered.prompt, add_special_tokens=False)["input_ids"])
    prefix = special_prefix(tokenizer) if rendered.prefix else []
    keep = max(max_len - len(prefix), 1)
    return prefix + ids[-keep:]


def _cut(new: list[int], stop: list[int]) -> list[int]:
    for i, t in enumerate(new):  # cut at the first stop token (it and padding after it)
        if t in stop:
            return new[:i]
    return new


def generate_batched(model: torch.nn.Module, prompts: Sequence[list[int]], max_new: int,
                     stop: list[int], *, batch_size: int, temperature: float = 0.0,
                     gen: torch.Generator | None = None, pad_id: int = 0,
                     cuda_graphs: bool = True, top_k: int | None = None, top_p: float | None = None,
                     stop_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> list[list[int]]:
    """New tokens for each prompt (stop token and what follows cut), in the prompts' order.
    `stop_fn` ends rows early on other criteria (see models.generate.generate)."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in rows], pad_id, device)  # [b, T] each
        result = generate(model, ids, max_new_tokens=max_new, temperature=temperature,
                          eos_token_id=stop or None, generator=gen, attention_mask=mask,
                          cuda_graph=cuda_graphs, top_k=top_k, top_p=top_p, stop_fn=stop_fn)
        for row, i in enumerate(rows):
            out[i] = _cut(result[row, ids.shape[1]:].tolist(), stop)
    return out


def evaluate_generation(
    model: torch.nn.Module, tokenizer: Any, items: Sequence[tuple[str, Any]], stop_ids: list[int],
    *, max_new_tokens: int, max_positions: int, out_path: str | Path | None,
    max_samples: int | None = None, temperature: float = 0.0, seed: int = 0,
    autocast: Any = None, batch_size: int = 16, cuda_graphs: bool = True,
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
    prompts = [prompt_ids(tokenizer, rendered, budget) for _, rendered in items]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
        answers = generate_batched(model, prompts, max_new_tokens, stop_ids,
                                   batch_size=batch_size, temperature=temperature, gen=gen,
                                   pad_id=pad_id, cuda_graphs=cuda_graphs)
    for i, ((where, rendered), new) in enumerate(zip(items, answers, strict=True)):
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        preds.append(text)
        rows.append({"index": i, "where": where, "prompt": rendered.prompt,
                     "reference": rendered.reference, "prediction": text,
                     **score_pair(text, rendered.reference)})
    model.train(was_training)
    scores = corpus_scores(preds, [r.reference for _, r in items])
    if out_path is not None:
        write_text_atomic(out_path, "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                            for row in rows), "predictions file", "predictions.jsonl")
    log.info("generation eval on %d samples: %s", len(items), scores)
    return scores
