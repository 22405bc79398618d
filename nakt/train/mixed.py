"""Semi-supervised batches: every batch holds a fixed share of labelled samples (true masks) beside pseudo-labelled
ones (a label set), as Noisy Student and Naive-Student train, rather than pseudo-labels first and fine-tuning
after.

An epoch is one pass over the pseudo-labelled samples; the labelled ones are cycled through fresh permutations as
often as the batches need them, so a small labelled set is seen many times an epoch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nakt.errors import NaktError
from nakt.train.data import TrainingSamples

__all__ = ["MixedSamples", "labelled_per_batch", "mixed_epoch_size", "mixed_order"]


def labelled_per_batch(batch_size: int, ratio: float) -> int:
    """Labelled samples in each batch: `ratio` of it, rounded, at least one of each kind.

    >>> labelled_per_batch(8, 0.5), labelled_per_batch(8, 0.01), labelled_per_batch(8, 0.99)
    (4, 1, 7)
    """
    if batch_size < 2:
        raise NaktError(None, "--labelled-ratio mixes labelled and pseudo-labelled samples in each batch",
                        "use --batch-size 2 or more")
    return min(max(round(ratio * batch_size), 1), batch_size - 1)


def mixed_epoch_size(n_pseudo: int, batch_size: int, ratio: float) -> int:
    """Samples in one epoch of `mixed_order` for `n_pseudo` pseudo-labelled samples (patches counted)."""
    labelled = labelled_per_batch(batch_size, ratio)
    return n_pseudo + labelled * math.ceil(n_pseudo / (batch_size - labelled))


def mixed_order(pseudo: np.ndarray, n_labelled: int, offset: int, batch_size: int, ratio: float,
                rng: np.random.Generator) -> np.ndarray:
    """One epoch's sample indices in consecutive batches of `batch_size` (the last one shorter): each batch the
    next ``batch_size - k`` of the `pseudo` order and `k` (`labelled_per_batch`) labelled indices ``offset ..
    offset + n_labelled - 1``, drawn from permutations of the labelled set cycled as often as needed."""
    labelled = labelled_per_batch(batch_size, ratio)
    step = batch_size - labelled
    batches = math.ceil(len(pseudo) / step)
    cycles = math.ceil(batches * labelled / n_labelled)
    drawn = np.concatenate([rng.permutation(n_labelled) for _ in range(cycles)]) + offset
    return np.concatenate([np.concatenate([pseudo[b * step:(b + 1) * step], drawn[b * labelled:(b + 1) * labelled]])
                           for b in range(batches)])


class MixedSamples(torch.utils.data.Dataset):
    """One Dataset of the pseudo-labelled samples (indices ``0 .. len(pseudo) - 1``) and the labelled ones after
    them, indexed by (index, seed) like `TrainingSamples`. Where the pseudo-labelled samples carry pixel weights
    (`weighted`: the teachers' agreement), a labelled sample is weighted fully."""

    def __init__(self, pseudo: TrainingSamples, labelled: TrainingSamples, weighted: bool = False):
        self.pseudo, self.labelled, self.weighted = pseudo, labelled, weighted

    def __len__(self) -> int:
        return len(self.pseudo) + len(self.labelled)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = item
        if index < len(self.pseudo):
            return self.pseudo[(index, seed)]
        sample = self.labelled[(index - len(self.pseudo), seed)]
        if self.weighted:
            sample = {**sample, "weight": torch.ones_like(sample["target"][:1])}
        return sample
