"""A deterministic, resumable, DDP-sharded stream of batches: each epoch's order is seeded from (seed,
epoch), and the stream's position is part of every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from weit_cli.errors import InputError


def epoch_order(n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """This rank's shuffled indices for `epoch`: a permutation seeded from (seed, epoch), cut to a
    multiple of world_size, every world_size-th element from `rank` (as DistributedSampler)."""
    g = torch.Generator().manual_seed(_mix(seed, epoch))
    perm = torch.randperm(n, generator=g)
    usable = n - n % world_size
    return perm[:usable][rank::world_size]


def _mix(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 12345) % (2**63 - 1)


@dataclass
class Batches:
    """Endless, deterministic batches from a TensorDataset; `state()`/`load_state()` resume exactly.

    Each epoch is `epoch_order(...)` for this rank, cut into full batches (a ragged tail is dropped
    so every step sees the same batch shape). `batch_size` is per rank.
    """

    dataset: Any
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    offset: int = 0  # batches already taken from this epoch
    _order: Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        n = len(self.dataset) // self.world_size
        if n == 0:
            raise InputError("the training split is empty", "check the data source")
        self.batch_size = min(self.batch_size, n)

    @property
    def batches_per_epoch(self) -> int:
        return (len(self.dataset) // self.world_size) // self.batch_size

    def next(self) -> tuple[Tensor, ...]:
        if self.offset >= self.batches_per_epoch:
            self.epoch, self.offset, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = epoch_order(len(self.dataset), seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size)
        idx = self._order[self.offset * self.batch_size : (self.offset + 1) * self.batch_size]
        self.offset += 1
        return tuple(t[idx] for t in self.dataset.tensors)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state(self, s: dict[str, int]) -> None:
        for k in ("seed", "batch_size", "world_size"):
            if k in s and s[k] != getattr(self, k):
                raise InputError(
                    f"the checkpoint was made with data {k} {s[k]}, this run uses {getattr(self, k)}",
                    "resume with the same recipe, data and number of processes",
                )
        self.epoch, self.offset, self._order = int(s["epoch"]), int(s["offset"]), None
