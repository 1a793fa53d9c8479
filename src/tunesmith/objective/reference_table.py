"""Precomputed reference log-probs for task=dpo (`dpo.precompute_reference`).

The reference policy is frozen, so a row's reference log-prob depends only on the row's tokens.
Before the first step every training and validation pair is scored once; afterwards each
micro-batch looks its rows up instead of running the reference forward. A full fine-tune then
frees its frozen copy (a second model's memory), and every step saves one forward.

Rows are keyed by their content, not by a dataset index: a 16-byte BLAKE2b digest of the row's
real tokens and labels (input_ids and labels up to its length, padding excluded), so the lookup
works whatever the shuffling, sharding, batch composition or padded length. The values are the
same numbers the per-step reference forward gives, up to the floating-point effects of a
different padded length or batch size (about 1e-7 relative in fp32).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable

import torch

from tunesmith.errors import TunesmithError

Score = Callable[[dict], torch.Tensor]  # batch -> reference log-probs per row [R] (device)


def row_keys(batch: dict) -> list[bytes]:
    """One key per row of a (host) batch: digest of its real input_ids and labels [n_r]."""
    ids, labels = batch["input_ids"], batch["labels"]  # [R, T] each
    mask = batch.get("attention_mask")  # [R, T]; right padding: its sum is the row's length
    lengths = mask.sum(dim=1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
    keys = []
    for r, n in enumerate(lengths):
        h = hashlib.blake2b(digest_size=16)
        h.update(ids[r, :n].to(torch.int64).numpy().tobytes())
        h.update(labels[r, :n].to(torch.int64).numpy().tobytes())
        keys.append(h.digest())
    return keys


class ReferenceTable:
    """{row key: reference log-prob}, complete on every rank."""

    def __init__(self, values: dict[bytes, float]) -> None:
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def lookup(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The batch's reference log-probs [R] (fp32, on `device`)."""
        try:
            found = [self.values[k] for k in row_keys(batch)]
        except KeyError:
            raise TunesmithError("dpo.precompute_reference: a batch row was not scored before "
                                 "training (the data changed after the precompute pass)") from None
        return torch.tensor(found, dtype=torch.float32).to(device, non_blocking=True)


@torch.no_grad()
def precompute(score: Score, loaders: Iterable[Iterable[dict]],
               gather: Callable[[dict], list[dict]] = lambda values: [values],
               ) -> tuple[ReferenceTable, float]:
    """Score every batch of `loaders` (this rank's shards); `gather` (all-gather of Python
    objects over the data-parallel ranks) gives each rank every rank's rows.
    Returns (table, seconds). Collective when the reference is sharded: every rank runs the
    same number of batches (non-dropping loaders pad the ranks to equal counts)."""
    start = time.perf_counter()
    values: dict[bytes, float] = {}
    for loader in loaders:
        for batch in loader:
            logp = score(batch).tolist()  # one host read per batch, before training only
            values.update(zip(row_keys(batch), logp, strict=True))
    merged: dict[bytes, float] = {}
    for part in gather(values):
        merged.update(part)
    return ReferenceTable(merged), time.perf_counter() - start


__all__ = ["ReferenceTable", "precompute", "row_keys"]
