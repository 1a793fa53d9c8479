"""Batch collators for causal LM.

Contract (the trainer relies on it exactly):
  input_ids      LongTensor[B, T]
  labels         LongTensor[B, T], ALREADY SHIFTED: labels[b, t] = input_ids[b, t + 1], the token
                 to predict at position t; -100 where there is none (last real position of each
                 example, padding). The loss is plain cross-entropy(logits[b, t], labels[b, t]).
  attention_mask LongTensor[B, T] (1 = real token), lines mode only, and only when the batch
                 actually has padding. Packed batches never carry one.
A packed block of T tokens therefore gives T - 1 targets, the same count as HF run_clm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tunesmith.config.schema import DataConfig
from tunesmith.errors import TunesmithError

IGNORE_INDEX = -100

Example = dict[str, Any]  # {"input_ids": list[int] | np.ndarray | Tensor, ...}


def _as_long(ids: Any) -> torch.Tensor:
    return torch.as_tensor(ids).to(torch.long).reshape(-1)


class PackedCollator:
    """Stacks equal-length blocks; no padding, no attention_mask."""

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        rows = [_as_long(ex["input_ids"]) for ex in examples]
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise ValueError(f"packed examples must have one length, got {sorted(lengths)}")
        input_ids = torch.stack(rows)  # [B, T]
        labels = torch.full_like(input_ids, IGNORE_INDEX)  # [B, T]
        labels[:, :-1] = input_ids[:, 1:]  # shift: position t predicts token t + 1
        return {"input_ids": input_ids, "labels": labels}


class PaddedCollator:
    """Right-pads examples to the longest one, or up to a multiple of `pad_to_multiple_of`."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def _target_length(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return longest if not m else -(-longest // m) * m

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        rows = [_as_long(ex["input_ids"]) for ex in examples]
        lengths = [len(r) for r in rows]
        batch, length = len(rows), self._target_length(max(lengths))
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)  # [B, T]
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        mask = torch.zeros((batch, length), dtype=torch.long)  # [B, T]
        for b, (row, n) in enumerate(zip(rows, lengths)):
            input_ids[b, :n] = row
            labels[b, : max(n - 1, 0)] = row[1:]  # targets only inside the example
            mask[b, :n] = 1
        out = {"input_ids": input_ids, "labels": labels}
        if any(n < length for n in lengths):
            out["attention_mask"] = mask
        return out


def make_collator(cfg: DataConfig, tokenizer: Any) -> PackedCollator | PaddedCollator:
    """The collator for `cfg.mode`: packed -> PackedCollator, lines -> PaddedCollator."""
    if cfg.mode == "packed":
        return PackedCollator()
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise TunesmithError(
            "data.mode=lines needs a pad token, and the tokenizer has neither pad nor eos"
        )
    return PaddedCollator(pad, cfg.pad_to_multiple_of)
