"""The order in which training visits its examples: length-grouped batches (less padding), drawn from a seed so that
a run resumed from a checkpoint replays the order of the run it continues.

`SeededLengthGroupedSampler` forms new batches each epoch. The trunk cache of head training (`trunk_cache.py`) needs
the same batches every epoch: `FixedBatchesSampler` forms length-grouped batches once and only changes the order in
which they are visited.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped sampler, drawing each epoch's order from `(seed, epoch)`.

    The stock sampler draws from the global random state when iteration starts, so a run resumed from a
    checkpoint sees a different order than the run it continues; this one replays the same order.
    """

    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return super().__iter__()


class FixedBatchesSampler(Sampler[int]):
    """Length-grouped batches formed once from `seed`, visited in a new order each epoch (from `seed` and the
    epoch); a last, smaller batch stays last, so that every batch is the same set of examples in every epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0):
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        indices = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(seed))
        self.batches = [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        full = [batch for batch in self.batches if len(batch) == self.batch_size]
        partial = [batch for batch in self.batches if len(batch) < self.batch_size]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for i in torch.randperm(len(full), generator=generator).tolist():
            yield from full[i]
        for batch in partial:
            yield from batch

    def __len__(self) -> int:
        return sum(len(batch) for batch in self.batches)
