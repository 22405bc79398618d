"""Preprocessing shared by training and inference: channels, intensity normalisation, resizing, label encoding.

Arrays are channel-first: images ``[C, *spatial]``, label maps ``[*spatial]``, probabilities ``[C, *spatial]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nakt.errors import NaktError
from nakt.models.card import ModelCard

__all__ = [
    "adapt_channels",
    "decode_labels",
    "encode_labels",
    "normalize",
    "one_hot",
    "prepare_image",
    "resize",
]


def adapt_channels(image: np.ndarray, in_channels: int, path: Path | None = None) -> np.ndarray:
    """Match a model's input channels: RGB -> grey by the channel mean, grey -> RGB by repetition."""
    c = image.shape[0]
    if c == in_channels:
        return image
    if in_channels == 1 and c in (3, 4):
        return image[:3].mean(axis=0, keepdims=True)
    if c == 1:
        return np.repeat(image, in_channels, axis=0)
    raise NaktError(path, f"image has {c} channels, the model takes {in_channels}")


def normalize(image: np.ndarray, method: str) -> np.ndarray:
    """Per-image, per-channel intensity normalisation: ``zscore``, ``minmax`` or ``none``.

    >>> normalize(np.array([[[0.0, 2.0]]]), "zscore").tolist()
    [[[-1.0, 1.0]]]
    """
    if method == "none":
        return image.astype(np.float32)
    axes = tuple(range(1, image.ndim))
    if method == "zscore":
        mean, std = image.mean(axis=axes, keepdims=True), image.std(axis=axes, keepdims=True)
        return ((image - mean) / np.maximum(std, 1e-6)).astype(np.float32)
    lo, hi = image.min(axis=axes, keepdims=True), image.max(axis=axes, keepdims=True)
    return ((image - lo) / np.maximum(hi - lo, 1e-6)).astype(np.float32)


def resize(x: torch.Tensor, size: tuple[int, ...], mode: str = "linear") -> torch.Tensor:
    """Resize ``[C, *spatial]`` to `size`: ``linear`` (bi/trilinear) or ``nearest`` (label maps)."""
    if tuple(x.shape[1:]) == tuple(size):
        return x
    dims = len(size)
    if mode == "nearest":
        return F.interpolate(x[None].float(), size=size, mode="nearest-exact")[0].to(x.dtype)
    interp = "bilinear" if dims == 2 else "trilinear"
    return F.interpolate(x[None].float(), size=size, mode=interp, align_corners=False,
                         antialias=dims == 2)[0]


def target_size(card: ModelCard, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """The grid the network sees: `card.size` when set (one value means a square/cube), else native."""
    if not card.size:
        return tuple(spatial)
    size = list(card.size) * len(spatial) if len(card.size) == 1 else list(card.size)
    if len(size) != len(spatial):
        raise NaktError(None, f"size {card.size} does not fit an image of {len(spatial)} dimensions")
    return tuple(size)


def prepare_image(image: np.ndarray, card: ModelCard, path: Path | None = None) -> torch.Tensor:
    """``[C, *spatial]`` raw -> ``[in_channels, *grid]`` normalised float tensor on the network's grid."""
    if image.ndim - 1 != card.spatial_dims:
        raise NaktError(path, f"image is {image.ndim - 1}D, the model is {card.spatial_dims}D")
    x = normalize(adapt_channels(image, card.in_channels, path), card.normalization)
    return resize(torch.from_numpy(x), target_size(card, image.shape[1:]))


def encode_labels(mask: np.ndarray, label_values: list[int], path: Path | None = None) -> np.ndarray:
    """Label values as stored (e.g. 0/255) -> class indices 0..C-1.

    >>> encode_labels(np.array([0, 255, 255]), [0, 255]).tolist()
    [0, 1, 1]
    """
    lut = {v: i for i, v in enumerate(label_values)}
    values = np.unique(mask)
    unknown = [int(v) for v in values if int(v) not in lut]
    if unknown:
        raise NaktError(path, f"mask holds label value(s) {unknown} unknown to the model",
                        f"model labels: {label_values}")
    out = np.zeros(mask.shape, dtype=np.int64)
    for v in values:
        out[mask == v] = lut[int(v)]
    return out


def decode_labels(classes: np.ndarray, label_values: list[int]) -> np.ndarray:
    """Class indices ``[*spatial]`` -> the label values written to files ``[*spatial]``, in the narrowest integer
    type that holds them (uint8 for values 0..255, what `nakt.io.images.write_label` stores them as anyway).

    >>> decode_labels(np.array([0, 1, 1]), [0, 255])
    array([  0, 255, 255], dtype=uint8)
    """
    values = np.asarray(label_values, dtype=np.int64)
    narrow = np.result_type(np.min_scalar_type(values.min()), np.min_scalar_type(values.max()))
    return values.astype(narrow)[classes]


def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``[B, *spatial]`` class indices -> ``[B, C, *spatial]`` float one-hot."""
    return F.one_hot(labels.long(), classes).movedim(-1, 1).float()
