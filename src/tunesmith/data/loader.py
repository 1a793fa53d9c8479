"""A resumable, rank-sharded batch loader over a map-style dataset.

Epoch e visits the dataset in the order `torch.randperm(N, generator=manual_seed(seed + e))`, so
the order depends only on (seed, epoch), never on how often the loader was created or iterated.
The permutation is dealt round-robin to ranks (`perm[rank::world_size]`, like DistributedSampler),
so ranks see disjoint samples and the same number of batches:

  drop_last=True : each rank takes N // W samples and drops its last incomplete batch.
  drop_last=False: the permutation is extended by wrapping around to a multiple of W (a few
                   samples repeat), and each rank's last batch may be short (same size on all).

Exact resume: `state_dict()` records (epoch, batches_done). After `load_state_dict`, iteration
yields exactly the remaining batches of that epoch; skipped batches are dropped from the batch
sampler by index, so their samples are never read or collated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader

from tunesmith.errors import TunesmithError

_STATE_VERSION = 1


class StatefulLoader:
    """Batches of `dataset` for one data-parallel rank, with exact mid-epoch resume."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if not isinstance(dataset, Sized) or len(dataset) == 0:
            raise TunesmithError("the dataset to load is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.epoch = 0
        self.batches_done = 0  # batches of `self.epoch` already handed out
        if len(self) == 0:
            raise TunesmithError(
                f"dataset has {len(dataset)} examples, fewer than one batch per rank "
                f"(batch_size={batch_size} x world_size={world_size}); lower the batch size "
                "or add data"
            )

    # ---------------------------------------------------------------- sizes and order

    def in_order(self) -> StatefulLoader:
        """The same data, batch size, collation and rank shard in dataset order: no shuffling,
        no dropped tail (ranks padded to equal counts, as an evaluation loader)."""
        return StatefulLoader(self.dataset, self.batch_size, collate_fn=self.collate_fn, seed=self.seed,
                              shuffle=False, drop_last=False, rank=self.rank, world_size=self.world_size,
                              num_workers=self.num_workers, pin_memory=self.pin_memory)

    def _samples_per_rank(self) -> int:
        n, w = len(self.dataset), self.world_size
        return n // w if self.drop_last else -(-n // w)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        per_rank = self._samples_per_rank()
        if self.drop_last:
            return per_rank // self.batch_size
        return -(-per_rank // self.batch_size)

    def _rank_indices(self, epoch: int) -> torch.Tensor:
        """This rank's indices for `epoch`, in visiting order: LongTensor[samples_per_rank]."""
        n = len(self.dataset)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(n, generator=gen)  # [N]
        else:
            perm = torch.arange(n)
        total = self._samples_per_rank() * self.world_size
        if total > n:  # drop_last=False: wrap around so every rank gets the same count
            perm = perm.repeat(-(-total // n))
        return perm[:total][self.rank :: self.world_size]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All of this rank's batches for `epoch` (index lists), before any skipping."""
        idx = self._rank_indices(epoch)
        n_batches, b = len(self), self.batch_size
        return [idx[i * b : (i + 1) * b].tolist() for i in range(n_batches)]

    # ---------------------------------------------------------------- iteration

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch`; a different epoch starts from its first batch, the same one resumes."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches_done = 0

    def __iter__(self) -> Iterator[Any]:
        if self.batches_done >= len(self):  # previous epoch finished: roll over
            self.epoch += 1
            self.batches_done = 0
        remaining = self.epoch_batches(self.epoch)[self.batches_done :]
        loader = DataLoader(
            self.dataset,
            batch_sampler=remaining,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Its own generator for the workers' base seed: drawn from the global RNG it would
            # shift every later draw (dropout, stochastic rounding) by one per epoch and resume.
            generator=torch.Generator().manual_seed(self.seed + self.epoch),
        )
        for batch in loader:
            # Counted before the yield: once the caller holds a batch it is done for resume.
            self.batches_done += 1
            yield batch

    # ---------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_samples": len(self.dataset),
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress; the order-defining settings must match or the resume is not exact."""
        mine = self.state_dict()
        for key in ("seed", "num_samples", "shuffle", "drop_last"):
            if key in state and state[key] != mine[key]:
                raise TunesmithError(
                    f"cannot resume the data loader exactly: {key} was {state[key]} in the "
                    f"checkpoint and is {mine[key]} now"
                )
        # Resharding (e.g. 4 ranks x 2 -> 2 ranks x 4): step i's global batch is always
        # perm[i*b*W : (i+1)*b*W] and an epoch has N // (b*W) of them, so only the product
        # b*W (samples per step across ranks) has to match for the same batches to follow.
        saved = int(state.get("batch_size", self.batch_size)) * int(state.get("world_size", self.world_size))
        if saved != self.batch_size * self.world_size:
            raise TunesmithError(
                f"cannot resume the data loader exactly: the checkpoint read {saved} samples per step "
                f"(batch_size x data-parallel ranks), this run reads {self.batch_size * self.world_size}"
            )
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
