"""Training augmentation for both tasks as MONAI dictionary transforms on one sample at a time,
``{"image": [C_in, *grid], "target": [C, *grid]}`` (classification samples have no spatial target).

The transforms are named and seeded one by one, so the resume state (`nakt.train.checkpoint.TrainingState`)
keeps each one's random generator and an interrupted run continues with the same draws.
"""

from __future__ import annotations

import math

import torch

__all__ = ["augment", "augmenters"]


def augmenters(spatial_dims: int, seed: int, keys: tuple[str, ...] = ("image", "target"), *, flips: bool = True,
               intensity: bool = True, spatial: bool = False, max_degrees: float = 15.0,
               max_scale: float = 0.15) -> dict[str, object]:
    """The transforms `augment` applies, in order, by name:

    - ``flip``: a left-right mirror (the last spatial axis) of every key for half the samples;
    - ``scale``, ``shift``: the image's intensities times ``1 + U(-0.1, 0.1)``, plus ``U(-0.1, 0.1)``
      (normalised units);
    - ``spatial``: a rotation (up to `max_degrees` about each axis) and scaling (1 +- `max_scale` per axis) of
      every key together for half the samples (bilinear on all keys, so soft targets stay probabilities;
      borders repeated).

    >>> sorted(augmenters(2, seed=0, spatial=True))
    ['flip', 'scale', 'shift', 'spatial']
    """
    from monai.transforms import RandAffined, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

    transforms: dict[str, object] = {}
    if flips:
        transforms["flip"] = RandFlipd(keys=keys, prob=0.5, spatial_axis=spatial_dims - 1)
    if intensity:
        transforms["scale"] = RandScaleIntensityd(keys="image", factors=0.1, prob=1.0)
        transforms["shift"] = RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0)
    if spatial:
        transforms["spatial"] = RandAffined(keys=keys, prob=0.5, mode=("bilinear",) * len(keys),
                                            padding_mode="border",
                                            rotate_range=[math.radians(max_degrees)] * (1 if spatial_dims == 2 else 3),
                                            scale_range=[max_scale] * spatial_dims)
    for offset, transform in enumerate(transforms.values()):
        transform.set_random_state(seed + offset)  # independent draws per transform
    return transforms


def augment(sample: dict[str, torch.Tensor], transforms: dict[str, object]) -> dict[str, torch.Tensor]:
    """`sample` through `transforms` in order; plain tensors back (MONAI returns MetaTensors)."""
    for transform in transforms.values():
        sample = transform(sample)
    return {k: v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v) for k, v in sample.items()}
