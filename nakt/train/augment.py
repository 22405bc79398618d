"""Training augmentation as MONAI dictionary transforms, seeded per sample.

Every training sample is drawn with its own seed (`nakt.train.loader.plan_epoch`), and `Augmentation` re-seeds
its transforms from it before each call. So a sample's augmentation depends only on (index, seed): the same
whether it is computed in the main process or a DataLoader worker, by one process or one of several (DDP), and
on an uninterrupted run or a resumed one (the epoch plan's generator is in the resume state; the transforms
need none).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["Augmentation", "sample_rng"]


def sample_rng(seed: int) -> np.random.Generator:
    """The generator for a sample's own random choices beside the transforms (e.g. where to crop)."""
    return np.random.default_rng(seed)


class Augmentation:
    """Random transforms of a sample dict ``{"image": [C_in, *grid], ...}``: with `flip`, a left-right flip
    (last spatial axis) of the image and of the `follow` keys (targets that move with it), half the time; with
    `intensity`, the image scaled by U(0.9, 1.1) and shifted by U(-0.1, 0.1) (it is z-scored or min-max scaled,
    so these are relative); with `spatial`, half the time a rotation (up to 15 degrees about each axis) and
    scaling (1 +- 0.15 per axis) of image and `follow` keys together, bilinear on both so that probability
    targets stay probabilities, borders repeated.

    ``augmentation(sample, seed)`` returns a new dict; the input's tensors are not modified.
    """

    def __init__(self, spatial_dims: int, follow: tuple[str, ...] = (), *, flip: bool = True, intensity: bool = True,
                 spatial: bool = False, max_degrees: float = 15.0, max_scale: float = 0.15):
        from monai.transforms import Compose, RandAffined, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

        keys = ("image", *follow)
        steps = []
        if flip:
            steps.append(RandFlipd(keys, prob=0.5, spatial_axis=spatial_dims - 1, allow_missing_keys=True))
        if intensity:
            steps += [RandScaleIntensityd("image", factors=0.1, prob=1.0),
                      RandShiftIntensityd("image", offsets=0.1, prob=1.0)]
        if spatial:
            steps.append(RandAffined(keys, prob=0.5, mode=["bilinear"] * len(keys), padding_mode="border",
                                     allow_missing_keys=True,
                                     rotate_range=[math.radians(max_degrees)] * (1 if spatial_dims == 2 else 3),
                                     scale_range=[max_scale] * spatial_dims))
        self.keys = keys
        self.transform = Compose(steps, lazy=False) if steps else None

    def __call__(self, sample: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        if self.transform is None:
            return sample
        self.transform.set_random_state(seed=seed % 2**32)
        out = self.transform(dict(sample))
        # MONAI returns MetaTensors; plain tensors collate and move to the device without metadata
        return {k: torch.as_tensor(v).as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v
                for k, v in out.items()}
