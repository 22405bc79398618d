"""Classification images prepared for a network, and their targets: ``[N, C_in, H, W]`` float16 tensors held in
memory (`load_images`) or read per access beyond a size limit (`LazyImages`), targets as class probabilities
``[N, C]``. Used by training (`nakt.train.classification`) and by label, predict and evaluate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nakt.classify.data import LabelTable
from nakt.inference import autocast
from nakt.io.images import read_image
from nakt.models import ModelCard, NaktModel
from nakt.preprocess import prepare_image

__all__ = ["CACHE_LIMIT_BYTES", "LazyImages", "class_balanced_weights", "load_images", "predict_probs", "target_probs",
           "training_images"]


CACHE_LIMIT_BYTES = 4 * 2**30  # training images held in memory up to this size; beyond it they are read per batch


def _image_shape(card: ModelCard) -> tuple[int, ...]:
    return (card.in_channels, *card.size * (2 if len(card.size) == 1 else 1))


def load_images(table: LabelTable, card: ModelCard, progress: bool = True) -> torch.Tensor:
    """Prepared images ``[N, C_in, *size]`` (float16 to halve memory; cast back per batch)."""
    out = torch.empty((len(table.images), *_image_shape(card)), dtype=torch.float16)
    for i, path in enumerate(tqdm(table.images, desc="read", unit="img", disable=not progress, leave=False)):
        out[i] = _prepared(path, card)
    return out


def _prepared(path: Path, card: ModelCard) -> torch.Tensor:
    """One image read and prepared for `card`, ``[C_in, *size]`` float16."""
    return prepare_image(read_image(path).array, card, path).half()


class LazyImages:
    """The images of `table`, read and prepared on each access: ``lazy[index]`` (a slice or an index array) is
    ``[len(index), C_in, *size]`` float16, like the same rows of `load_images`."""

    def __init__(self, table: LabelTable, card: ModelCard):
        self.table, self.card = table, card

    def __len__(self) -> int:
        return len(self.table.images)

    def __getitem__(self, index) -> torch.Tensor:
        picks = range(len(self))[index] if isinstance(index, slice) else np.atleast_1d(np.asarray(index))
        return torch.stack([_prepared(self.table.images[i], self.card) for i in picks])


def training_images(table: LabelTable, card: ModelCard, progress: bool = True,
                    cache_limit: int | None = None) -> torch.Tensor | LazyImages:
    """`load_images` when the prepared set fits in `cache_limit` bytes (default `CACHE_LIMIT_BYTES`; fast
    epochs), else `LazyImages` (memory bounded by a batch; every epoch reads from disk)."""
    cache_limit = CACHE_LIMIT_BYTES if cache_limit is None else cache_limit
    if len(table.images) * math.prod(_image_shape(card)) * 2 <= cache_limit:
        return load_images(table, card, progress)
    return LazyImages(table, card)


def target_probs(table: LabelTable) -> torch.Tensor:
    """Targets as probabilities ``[N, C]``: one-hot for class indices, as given otherwise."""
    if table.kind == "index":
        return torch.eye(len(table.class_names))[torch.as_tensor(table.targets)]
    return torch.as_tensor(table.targets, dtype=torch.float32)


@torch.no_grad()
def predict_probs(model: NaktModel, images: torch.Tensor | LazyImages, batch_size: int = 64,
                  precision: str = "fp32") -> np.ndarray:
    """Class probabilities ``[N, C]`` (float32) for prepared images ``[N, C_in, H, W]``; the network runs in
    `precision` (a resolved one: ``fp32``, ``bf16``, ``fp16``)."""
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float().to(device)  # read (LazyImages) outside autocast: float16 storage
        with autocast(precision, device):
            parts.append(model.predict_proba(x).float().cpu())
    return torch.cat(parts).numpy()


def class_balanced_weights(targets: torch.Tensor) -> np.ndarray:
    """Sampling probabilities ``[N]`` giving every class (the argmax of the targets ``[N, C]``) the same total."""
    classes = targets.argmax(1).numpy()
    counts = np.bincount(classes)
    weights = 1.0 / counts[classes]
    return weights / weights.sum()
