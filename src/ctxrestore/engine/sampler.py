"""Which dataset items each process sees at each step: a function of (seed, epoch, rank).

Because the order is recomputed, not stored, a resumed run starts mid-epoch at exactly the
batch where it stopped, on any number of processes, without reading skipped items.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ctxrestore.errors import CtxRestoreError


class EpochSampler(Sampler[int]):
    """Shuffled, sharded indices for one epoch, from batch `start_batch` on.

    Each step uses `batch_size` items in all, `batch_size // world_size` per process; the tail
    of an epoch that does not fill a step is dropped, so every step has the same shape.
    """

    def __init__(
        self, length: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size % world_size:
            raise CtxRestoreError(
                f"batch_size {batch_size} must be divisible by the number of processes "
                f"({world_size})"
            )
        if length < batch_size:
            raise CtxRestoreError(
                f"the dataset has {length} images, fewer than batch_size {batch_size}; use a "
                f"smaller batch_size or more images"
            )
        self.length = length
        self.batch_size = batch_size
        self.per_rank = batch_size // world_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.length // self.batch_size

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator)
        steps = order[: self.steps_per_epoch * self.batch_size].view(
            self.steps_per_epoch, self.world_size, self.per_rank
        )
        return iter(steps[self.start_batch :, self.rank].reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_batch) * self.per_rank
