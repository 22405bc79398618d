"""Training samples in memory and the batches drawn from them.

A sample holds the prepared image ``[C_in, *grid]`` and its target on the same grid: class indices
``[*grid]`` (int64) from a mask, or probabilities ``[C, *grid]`` (float16) from a label set's soft labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nakt.errors import NaktError
from nakt.io import labelset
from nakt.io.dataset import Case
from nakt.io.images import read_image, read_mask
from nakt.models.card import ModelCard
from nakt.preprocess import encode_labels, one_hot, prepare_image, resize, target_size

__all__ = ["Sample", "batches", "hard_target", "label_values_of", "make_samples", "read_cases", "read_label_map",
           "spatial_augmenter"]


@dataclass
class Sample:
    name: str
    image: torch.Tensor
    target: torch.Tensor
    path: Path


def read_cases(cases: list[Case], progress: bool = True,
               orientation: str = "RAS") -> list[tuple[Case, object, np.ndarray]]:
    """Read every case's image and mask (checking that sizes match; 3D ones reoriented to `orientation`);
    returns (case, Image, mask) triples."""
    out = []
    for case in tqdm(cases, desc="read", unit="case", disable=not progress, leave=False):
        image = read_image(case.images, orientation=orientation)
        if case.mask is None:
            raise NaktError(case.images[0], f"no mask for case {case.name!r}")
        out.append((case, image, read_label_map(case.mask, like=image)))
    return out


MAX_LABELS = 64


def read_label_map(path: Path, like=None) -> np.ndarray:
    """`read_mask` for masks a user gives: refused when lossy (JPEG) or holding more than `MAX_LABELS` values
    (a photograph rather than a label map)."""
    if str(path).lower().endswith((".jpg", ".jpeg")):
        raise NaktError(path, "JPEG is lossy and cannot hold a label map",
                        "store masks as PNG, TIFF, NIfTI, MHA or NRRD")
    mask = read_mask(path, like=like)
    if len(np.unique(mask)) > MAX_LABELS:
        raise NaktError(path, f"holds more than {MAX_LABELS} distinct values: not a label map")
    return mask


def label_values_of(items) -> list[int]:
    """The sorted union of label values over the masks of (case, image, mask) items, 0 always included.

    More than `MAX_LABELS` values means a file is not a label map (a photo, or a JPEG-compressed mask).
    """
    values = {0}
    for case, _, mask in items:
        values.update(int(v) for v in np.unique(mask))
        if len(values) > MAX_LABELS:
            raise NaktError(case.mask, f"masks hold more than {MAX_LABELS} distinct values",
                            "is this an image rather than a label map, or a lossy (JPEG) mask?")
    return sorted(values)


def make_samples(items, card: ModelCard, soft_from: Path | None = None) -> list[Sample]:
    """Prepare images and targets on the network's grid. With `soft_from` (a label set), targets are its
    soft probabilities where present."""
    samples = []
    for case, image, mask in items:
        x = prepare_image(image.array, card, case.images[0])
        grid = target_size(card, image.spatial_shape)
        probs = labelset.read_probs(soft_from, case.name) if soft_from is not None else None
        if probs is not None:
            if probs.shape != (card.classes, *image.spatial_shape):
                raise NaktError(labelset.probs_path(soft_from, case.name),
                                f"probabilities of shape {probs.shape} do not fit the image "
                                f"({card.classes} classes x {image.spatial_shape})")
            target = resize(torch.from_numpy(probs), grid).half()
        else:
            labels = encode_labels(mask, card.label_values, case.mask)
            target = resize(torch.from_numpy(labels)[None], grid, mode="nearest")[0]
        samples.append(Sample(case.name, x, target, case.images[0]))
    return samples


def hard_target(target: torch.Tensor) -> torch.Tensor:
    """Class indices ``[*grid]`` from either target form."""
    return target if target.dtype == torch.int64 else target.float().argmax(0)


def _crop(sample: Sample, patch: tuple[int, ...], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    image, target = sample.image, sample.target
    soft = target.dtype != torch.int64
    spatial = image.shape[1:]
    pad = [max(0, p - s) for p, s in zip(patch, spatial)]
    if any(pad):
        flat = [v for p in reversed(pad) for v in (p // 2, p - p // 2)]
        image = F.pad(image, flat)
        if soft:  # padding is background with certainty
            target = F.pad(target.float(), flat)
            target[0][target.sum(0) == 0] = 1
        else:
            target = F.pad(target, flat)
        spatial = image.shape[1:]
    hard = hard_target(target)
    fg = torch.nonzero(hard > 0)
    if len(fg) and rng.random() < 0.5:  # half the patches centred on foreground, so small structures are seen
        centre = fg[rng.integers(len(fg))].tolist()
        start = [min(max(c - p // 2, 0), s - p) for c, p, s in zip(centre, patch, spatial)]
    else:
        start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, spatial)]
    window = tuple(slice(a, a + p) for a, p in zip(start, patch))
    return image[(slice(None), *window)], target[(slice(None), *window)] if soft else target[window]


def spatial_augmenter(spatial_dims: int, seed: int, max_degrees: float = 15.0, max_scale: float = 0.15):
    """A random rotation (up to `max_degrees` about each axis) and scaling (1 +- `max_scale` per axis) of
    image and target together, for half the samples (MONAI `RandAffined`; bilinear on both, so soft targets
    stay probabilities; borders are repeated)."""
    from monai.transforms import RandAffined

    augmenter = RandAffined(keys=("image", "target"), prob=0.5, mode=("bilinear", "bilinear"), padding_mode="border",
                            rotate_range=[math.radians(max_degrees)] * (1 if spatial_dims == 2 else 3),
                            scale_range=[max_scale] * spatial_dims)
    augmenter.set_random_state(seed)
    return augmenter


def batches(samples: list[Sample], batch_size: int, classes: int, rng: np.random.Generator,
            patch: tuple[int, ...] | None = None, patches_per_case: int = 1, augment: bool = False,
            spatial=None):
    """Yield ``(images [B, C_in, *grid], targets [B, C, *grid] probabilities)`` for one epoch; `spatial` is a
    `spatial_augmenter` (or None)."""
    order = np.concatenate([rng.permutation(len(samples)) for _ in range(patches_per_case if patch else 1)])
    for start in range(0, len(order), batch_size):
        xs, ys = [], []
        for i in order[start:start + batch_size]:
            s = samples[i]
            x, y = _crop(s, patch, rng) if patch else (s.image, s.target)
            if y.dtype == torch.int64:
                y = one_hot(y[None], classes)[0]
            else:  # float16 storage rounds; targets must sum to 1 exactly
                y = y.float() / y.float().sum(0, keepdim=True).clamp_min(1e-6)
            if augment:
                if rng.random() < 0.5:
                    x, y = x.flip(-1), y.flip(-1)
                x = x * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.1, 0.1))
            if spatial is not None:
                moved = spatial({"image": x, "target": y})
                x, y = torch.as_tensor(moved["image"]), torch.as_tensor(moved["target"])
            xs.append(x)
            ys.append(y)
        if len(xs) == 1 and len(order) > 1:
            continue  # a lone last sample would break BatchNorm; it is drawn again next epoch
        yield torch.stack(xs), torch.stack(ys)
