"""Segmentation for the training engine: `SegmentationTask` (batches of crops or resized images with soft or
hard targets, soft Dice + cross-entropy, validation Dice) and `train_segmentation`, which reads the cases, builds
the model card and runs the engine."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from nakt.batched import autocast
from nakt.errors import NaktError
from nakt.inference import probs_on_grid
from nakt.io import labelset, rundir
from nakt.io.dataset import discover_cases
from nakt.metrics import case_scores
from nakt.models import ModelCard, NaktModel, build_model, parse_spec
from nakt.train.data import Sample, batches, hard_target, label_values_of, make_samples, read_cases, spatial_augmenter
from nakt.train.losses import SoftDiceCELoss
from nakt.train.setup import build_student, prepare_out, record_of, run_training, split

__all__ = ["OPTIONS", "SegmentationTask", "train_segmentation"]

# options only segmentation takes: `nakt.train.train` refuses them for another task
OPTIONS = ("masks", "val_masks", "mask_file", "channels", "label_values", "patch", "patches_per_case", "hard_labels",
           "spatial_augment", "orientation")


class SegmentationTask:
    """Training samples (`Sample`: image ``[C_in, *grid]``, target class indices or probabilities) drawn as
    batches ``{"image": [B, C_in, *grid], "target": [B, C, *grid]}`` (probabilities), whole or as `patch` crops
    (`patches_per_case` per case and epoch), with flips and intensity jitter (`augment`) and random rotations
    and scalings (`spatial_augment`). The loss is soft Dice + cross-entropy; pixels whose target's top
    probability is below `min_confidence` are left out of it. The score is the mean foreground Dice of the
    validation samples on the network's grid."""

    metric = "dice"

    def __init__(self, card: ModelCard, train: list[Sample], val: list[Sample], *, patch: tuple[int, ...] | None = None,
                 patches_per_case: int = 1, augment: bool = False, spatial_augment: bool = False,
                 min_confidence: float = 0.0, seed: int = 0):
        self.card, self.train, self.val = card, train, val
        self.patch, self.patches_per_case, self.augment = patch, patches_per_case, augment
        self.min_confidence = min_confidence
        self.spatial = spatial_augmenter(card.spatial_dims, seed) if spatial_augment else None
        self.transforms = {"spatial": self.spatial}
        self.loss_fn = SoftDiceCELoss()

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, math.ceil(len(self.train) * (self.patches_per_case if self.patch else 1) / batch_size))

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for x, y in batches(self.train, batch_size, self.card.classes, rng, self.patch, self.patches_per_case,
                            self.augment, self.spatial):
            yield {"image": x, "target": y}

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        y = batch["target"]
        mask = (y.amax(1, keepdim=True) >= self.min_confidence).float() if self.min_confidence > 0 else None
        return self.loss_fn(logits, y, mask)

    @torch.no_grad()
    def validate(self, model: NaktModel, precision: str = "fp32", batch_size: int = 8) -> float | None:
        """Mean foreground Dice over the validation samples, in batches of same-shape images. 2D networks run
        channels-last here, as `nakt.batched` runs them for label, predict and evaluate, so that the score is the
        one ``nakt evaluate`` reports for these weights (reduced precision rounds differently per layout)."""
        if not self.val:
            return None
        model.eval()
        device = next(model.parameters()).device
        nhwc = self.card.spatial_dims == 2
        layout = torch.channels_last if nhwc else torch.contiguous_format
        model.to(memory_format=layout)
        scores = []
        for chunk in _same_shape_runs(self.val, batch_size):
            x = torch.stack([s.image for s in chunk]).to(device).contiguous(memory_format=layout)
            with autocast(precision, device):
                probs = probs_on_grid(model, x, autocast=False)
            for s, predicted in zip(chunk, probs.argmax(1).cpu().numpy()):
                scores.append(case_scores(predicted, hard_target(s.target).numpy(), self.card.classes,
                                          hd95=False)["dice"])
        if nhwc and device.type != "cuda":  # the engine trains NCHW on the CPU (`engine.uses_channels_last`)
            model.to(memory_format=torch.contiguous_format)
        return float(np.mean(scores))

    def encoder(self, model: NaktModel) -> list[str]:
        """An encoder-decoder net's (smp) encoder; other nets (MONAI's) have none to freeze."""
        encoder = getattr(model.net, "encoder", None)
        return [] if encoder is None else [f"net.encoder.{n}" for n, _ in encoder.named_parameters()]


def _same_shape_runs(samples: list[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """Consecutive samples of one image shape, at most `batch_size` at a time (native-size patch models see
    images of many shapes)."""
    run: list[Sample] = []
    for s in samples:
        if run and (len(run) == batch_size or s.image.shape != run[0].image.shape):
            yield run
            run = []
        run.append(s)
    if run:
        yield run


def train_segmentation(opts) -> Path:
    """`nakt train --task segmentation`: `opts` is a `TrainOptions` with `masks` (a folder or a label set)."""
    if opts.masks is None:
        raise NaktError(None, "missing option 'masks'", "give --masks DIR (or --task classification --labels)")
    started = time.time()
    if parse_spec(opts.model)[0] not in ("run", "torchscript"):
        build_model(ModelCard(opts.model, 1, 2))  # an unknown architecture fails now, not after reading data
    masks = Path(opts.masks)
    soft_from = label_set = None
    if labelset.is_label_set(masks):
        label_set = masks
        soft_from = None if opts.hard_labels else masks
        masks = masks / "masks"
    orientation = _orientation(opts, label_set)
    cases = discover_cases(opts.images, masks, opts.cases, opts.channels, opts.mask_file, require_masks=True)
    items = read_cases(cases, opts.progress, orientation)
    if opts.val_images is not None:
        val_cases = discover_cases(opts.val_images, opts.val_masks or masks, opts.val_cases,
                                   opts.channels, opts.mask_file, require_masks=True)
        train_items, val_items = items, read_cases(val_cases, opts.progress, orientation)
    else:
        train_items, val_items = split(items, opts.val_fraction, opts.seed)

    card, init_run = _card_for(opts, train_items + val_items, label_set)
    model = build_student(opts, card, init_run)
    _check_grid(card, [image.spatial_shape for _, image, _ in train_items])
    prepare_out(opts)
    train_samples = make_samples(train_items, card, soft_from)
    val_samples = make_samples(val_items, card)
    patch = None
    if card.patch:
        patch = tuple(card.patch * card.spatial_dims if len(card.patch) == 1 else card.patch)
    record = record_of(opts)
    record.update(continued_from=init_run, soft_targets=soft_from is not None,
                  trained_on=[s.name for s in train_samples], validated_on=[s.name for s in val_samples])
    task = SegmentationTask(card, train_samples, val_samples, patch=patch, patches_per_case=opts.patches_per_case,
                            augment=opts.augment, spatial_augment=opts.spatial_augment,
                            min_confidence=opts.min_confidence, seed=opts.seed)
    return run_training(opts, card, model, task, record, started=started)


def _orientation(opts, label_set: Path | None) -> str:
    """The orientation 3D volumes are read in: the continued run's, else `opts.orientation`. A label set's soft
    probabilities lie on its teachers' grid, so its orientation must be the same."""
    orientation = opts.orientation
    if parse_spec(opts.model)[0] == "run":
        orientation = rundir.read_config(Path(opts.model))[0].orientation
    if label_set is not None:
        theirs = labelset.read_manifest(label_set).get("orientation", "RAS")
        if theirs.upper() != orientation.upper():
            raise NaktError(label_set, f"was labelled in orientation {theirs}, the student reads {orientation}",
                            f"train with --orientation {theirs}")
    return orientation


def _card_for(opts, items, label_set: Path | None) -> tuple[ModelCard, str | None]:
    """The model card: from the run being continued, or from the data (channels, classes, dimensions)
    unless `in_channels` / `label_values` are given. A label set's classes are its teachers' (from its
    manifest), soft or hard targets alike: its masks may never show a rare class."""
    if parse_spec(opts.model)[0] == "run":
        card, _ = rundir.read_config(Path(opts.model))
        return card, opts.model
    if opts.resume:  # the recorded card: the data could only rebuild the same one
        return rundir.read_config(Path(opts.out), require_complete=False)[0], None
    first = items[0][1]
    for case, image, _ in items:
        if image.array.shape[0] != first.array.shape[0] or image.array.ndim != first.array.ndim:
            raise NaktError(case.images[0], f"{image.array.shape[0]} channel(s), {image.array.ndim - 1}D; "
                            f"{items[0][0].name} has {first.array.shape[0]}, {first.array.ndim - 1}D")
    spatial_dims = first.array.ndim - 1
    if label_set is not None:
        values = [int(v) for v in labelset.read_manifest(label_set)["label_values"]]
        extra = sorted(set(label_values_of(items)) - set(values))
        if extra:
            raise NaktError(label_set, f"masks hold label values {extra} missing from the manifest")
    else:
        values = label_values_of(items)
    if opts.label_values is not None:
        extra = sorted(set(values) - set(opts.label_values))
        if extra:
            raise NaktError(opts.masks, f"masks hold label values {extra} not in --label-values {opts.label_values}")
        values = sorted(set(opts.label_values) | {0})
    if len(values) < 2:
        raise NaktError(opts.masks, "every mask is empty: nothing to learn")
    size, patch = opts.size, opts.patch
    if size is None and patch is None:
        size, patch = ([256] if spatial_dims == 2 else None), (None if spatial_dims == 2 else [96])
    card = ModelCard(spec=opts.model, in_channels=opts.in_channels or first.array.shape[0], classes=len(values),
                     spatial_dims=spatial_dims, label_values=values, size=size, patch=patch,
                     normalization=opts.normalization, model_kwargs=dict(opts.model_kwargs),
                     orientation=opts.orientation)
    return card, None


def _check_grid(card: ModelCard, shapes: list[tuple[int, ...]]) -> None:
    """Each side the network sees must exceed its downsampling factor, or the deepest layer gets one pixel."""
    from nakt.preprocess import target_size

    grids = [card.patch * card.spatial_dims if len(card.patch) == 1 else card.patch] if card.patch else [
        target_size(card, shape) for shape in shapes[:1]]
    for grid in grids:
        if min(grid) <= card.size_divisor:
            what = "--patch" if card.patch else "--size"
            raise NaktError(None, f"{what} {list(grid)} is too small for {card.spec}, which downsamples "
                            f"{card.size_divisor}x", f"use sides larger than {card.size_divisor}")
