"""Batches for the training engine: each epoch's plan of (sample index, seed) batches is drawn from the engine's
generator, and a torch DataLoader (with workers, or in the main process) reads them from the task's Dataset.

The plan is the only randomness outside the samples: a sample's crop and augmentation come from its seed
(`nakt.train.augment`). So the batches are the same with any number of workers, cached or streamed, and under
DDP every rank reads its share of the same global batch (`rank::world`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["PlannedLoader", "plan_epoch"]

Plan = list[list[tuple[int, int]]]


def plan_epoch(order: np.ndarray, batch_size: int, rng: np.random.Generator, world: int = 1) -> Plan:
    """Split the epoch's sample `order` into global batches of `batch_size` (index, seed) pairs, each sample
    with a seed drawn from `rng`. A last batch that would leave a rank fewer than two samples is dropped
    (BatchNorm needs two; its samples come again next epoch) unless it is the only one."""
    seeds = rng.integers(0, 2**63 - 1, size=len(order))
    plan = [[(int(i), int(s)) for i, s in zip(order[start:start + batch_size], seeds[start:start + batch_size])]
            for start in range(0, len(order), batch_size)]
    if len(plan) > 1 and len(plan[-1]) < 2 * world:
        plan.pop()
    return plan


class _PlanSampler(torch.utils.data.Sampler):
    """A batch sampler whose batches are replaced every epoch (persistent workers keep running between)."""

    def __init__(self):
        self.plan: Plan = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


class PlannedLoader:
    """Reads planned batches from `dataset` (indexed by (index, seed)) with `num_workers` processes; with
    `world` > 1 this rank reads ``batch[rank::world]`` of every global batch."""

    def __init__(self, dataset: torch.utils.data.Dataset, num_workers: int = 0, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world
        self.sampler = _PlanSampler()
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                                  persistent_workers=num_workers > 0)

    def epoch(self, plan: Plan) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of `plan`, in order (dicts of stacked tensors)."""
        self.sampler.plan = [batch[self.rank::self.world] for batch in plan]
        return iter(self.loader)
