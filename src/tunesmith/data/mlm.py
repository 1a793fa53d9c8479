"""Dynamic masking for masked-LM training (BERT / RoBERTa recipe).

Each batch selects `probability` (15%) of the non-special tokens; of those, `mask_fraction`
(80%) become the mask token, `random_fraction` (10%) a random token, the rest stay. Labels are
the original ids at selected positions and -100 elsewhere; they are NOT shifted (an encoder
predicts the token at its own position), which the trainer's loss handles unchanged.

Masks are drawn fresh for every batch ("dynamic", as RoBERTa), from a generator seeded by the
run seed and the batch's own token ids, so a resumed run re-draws exactly the same masks for
the same batch and evaluation masks are identical from one evaluation to the next.

Whole-word masking selects words instead of tokens: a token continues a word when it is a
WordPiece continuation (`##x`), or, for byte-level BPE / SentencePiece vocabularies, when it
does not start with the word-boundary marker (`Ġ` / `▁`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.errors import TunesmithError

IGNORE_INDEX = -100


@dataclass
class MaskingSpec:
    """What the collator needs from a tokenizer (buildable by hand in tests)."""

    mask_token_id: int
    pad_token_id: int
    vocab_size: int
    special_ids: list[int]
    continues_word: torch.Tensor | None = None  # bool [V]: token continues the previous word

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, whole_word: bool = False) -> MaskingSpec:
        if tokenizer.mask_token_id is None:
            raise TunesmithError(
                "task=mlm needs a tokenizer with a mask token (e.g. [MASK] or <mask>); this one "
                "has none: use a BERT/RoBERTa tokenizer or add one with add_special_tokens")
        pad = tokenizer.pad_token_id
        pad = pad if pad is not None else tokenizer.eos_token_id
        if pad is None:
            raise TunesmithError("task=mlm needs a pad token; the tokenizer has neither pad "
                                 "nor eos")
        cont = _word_continuation_table(tokenizer) if whole_word else None
        return cls(int(tokenizer.mask_token_id), int(pad), len(tokenizer),
                   sorted(set(tokenizer.all_special_ids)), cont)


def _word_continuation_table(tokenizer: Any) -> torch.Tensor:
    """bool [V]: True where the token continues the word of the previous token."""
    vocab = tokenizer.get_vocab()  # token string -> id
    table = torch.zeros(len(tokenizer), dtype=torch.bool)
    tokens = list(vocab)
    if any(t.startswith("##") for t in tokens):
        marks = [(t, t.startswith("##")) for t in tokens]
    else:
        marker = "Ġ" if sum(t.startswith("Ġ") for t in tokens) >= sum(
            t.startswith("▁") for t in tokens) else "▁"
        # A token without the boundary marker continues a word if it is alphanumeric text.
        marks = [(t, not t.startswith(marker) and t.isalnum()) for t in tokens]
    for t, cont in marks:
        if cont and vocab[t] < len(table):
            table[vocab[t]] = True
    for sid in tokenizer.all_special_ids:
        table[sid] = False
    return table


class MLMCollator:
    """Pads examples (dynamic length) and masks them. Output: input_ids, labels [B, T] and
    attention_mask [B, T] when the batch has padding."""

    def __init__(self, spec: MaskingSpec, *, probability: float = 0.15,
                 mask_fraction: float = 0.8, random_fraction: float = 0.1,
                 whole_word: bool = False, seed: int = 0,
                 pad_to_multiple_of: int | None = None) -> None:
        if whole_word and spec.continues_word is None:
            raise ValueError("whole_word masking needs MaskingSpec.continues_word")
        self.spec = spec
        self.p = probability
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction
        self.whole_word = whole_word
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self._special = torch.tensor(spec.special_ids, dtype=torch.long)

    def _generator(self, ids: torch.Tensor) -> torch.Generator:
        digest = zlib.crc32(ids.numpy().tobytes())
        return torch.Generator().manual_seed((self.seed * 0x9E3779B1 + digest) % (2**63))

    def pad(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [torch.as_tensor(ex["input_ids"]).long().reshape(-1) for ex in examples]
        longest = max(len(r) for r in rows)
        m = self.pad_to_multiple_of
        length = longest if not m else -(-longest // m) * m
        ids = torch.full((len(rows), length), self.spec.pad_token_id, dtype=torch.long)
        real = torch.zeros((len(rows), length), dtype=torch.long)  # [B, T]
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            real[i, : len(r)] = 1
        return ids, real

    def select(self, ids: torch.Tensor, real: torch.Tensor, gen: torch.Generator
               ) -> torch.Tensor:
        """bool [B, T]: positions to predict."""
        can = real.bool() & ~torch.isin(ids, self._special)  # [B, T]
        if not self.whole_word:
            return can & (torch.rand(ids.shape, generator=gen) < self.p)
        cont = self.spec.continues_word[ids.clamp(max=len(self.spec.continues_word) - 1)]
        starts = can & ~cont  # a word starts at a maskable token that does not continue one
        starts[:, 0] |= can[:, 0]
        word = torch.cumsum(starts.long(), dim=1)  # [B, T]: word number within the row
        pick = torch.rand(ids.shape, generator=gen) < self.p  # one draw per word start
        chosen = torch.zeros_like(ids, dtype=torch.bool)
        chosen_words = torch.where(starts & pick, word, 0)  # [B, T]
        for b in range(ids.shape[0]):  # B is small; words per row vary
            picked = chosen_words[b][chosen_words[b] > 0].unique()
            chosen[b] = torch.isin(word[b], picked)
        return chosen & can

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, real = self.pad(examples)  # [B, T] each
        gen = self._generator(ids)
        chosen = self.select(ids, real, gen)
        labels = torch.where(chosen, ids, IGNORE_INDEX)
        u = torch.rand(ids.shape, generator=gen)  # one draw decides mask / random / keep
        to_mask = chosen & (u < self.mask_fraction)
        to_random = chosen & (u >= self.mask_fraction) & (
            u < self.mask_fraction + self.random_fraction)
        random_ids = torch.randint(self.spec.vocab_size, ids.shape, generator=gen)
        inputs = torch.where(to_mask, self.spec.mask_token_id, ids)
        inputs = torch.where(to_random, random_ids, inputs)
        out = {"input_ids": inputs, "labels": labels}
        if not bool(real.all()):
            out["attention_mask"] = real
        return out
