"""Segmentation for the training engine: `SegmentationTask` (batches of crops or resized images with soft or
hard targets, soft Dice + cross-entropy, validation Dice) and `train_segmentation`, which reads the cases, builds
the model card and runs the engine."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from nakt.errors import NaktError
from nakt.inference import autocast, probs_on_grid
from nakt.io import labelset, rundir, tables
from nakt.io.dataset import discover_cases
from nakt.labelspace import Unified
from nakt.machine import channels_last_pays
from nakt.metrics import case_scores
from nakt.models import ModelCard, NaktModel, build_model, parse_spec
from nakt.preprocess import target_size
from nakt.teachers import teacher_space
from nakt.train.augment import Augmentation
from nakt.train.data import CaseInfo, TrainingSamples, cached_cases, hard_target, label_values_of, survey_cases
from nakt.train.losses import SoftDiceCELoss
from nakt.train.mixed import MixedSamples, mixed_epoch_size, mixed_order
from nakt.train.online import load_net_teachers, online_teachers
from nakt.train.setup import build_student, loader_workers, memory_cache_gb, prepare_out, record_of, run_training, split

__all__ = ["OPTIONS", "SegmentationTask", "train_segmentation"]

# options only segmentation takes: `nakt.train.train` refuses them for another task
OPTIONS = ("masks", "val_masks", "mask_file", "channels", "label_values", "patch", "patches_per_case", "hard_labels",
           "spatial_augment", "orientation", "pixel_weights", "disk_cache", "annotated_classes", "labelled_images",
           "labelled_masks", "labelled_cases", "labelled_ratio", "val_metric", "batch_dice")
PIXEL_WEIGHTS = ("none", "agreement", "confidence")
VAL_METRICS = ("dice", "pooled")


class SegmentationTask:
    """Training samples (`TrainingSamples`: prepared cases from `train`, a `cached_cases` dataset) whole or as
    `patch` crops (`patches_per_case` per case and epoch), with flips and intensity jitter (`augment`) and random
    rotations and scalings (`spatial_augment`), targets as probabilities ``[C, *grid]``. The loss is soft Dice +
    cross-entropy against the targets, or with online teachers against ``alpha`` x their fused probabilities +
    the rest x the targets (the teachers alone without targets); pixels whose target's top probability is below
    `min_confidence` are left out of it. `pixel_weights` weighs every pixel's share of the loss instead:
    ``agreement``, by the fraction of teachers agreeing with the fused label there (the samples' ``"weight"``,
    from the label set), ``confidence``, by the target's top probability rescaled from 1/C..1 to 0..1.
    `batch_dice`: the Dice term per class over the whole batch, not per sample (`SoftDiceCELoss`). The
    score (`val_metric`) is the mean over the `val` cases of their foreground Dice (``dice``) or the mean over
    classes of each class's Dice pooled over all `val` pixels (``pooled``), on the network's grid, read by
    `num_workers` processes unless all of them are cached. Partially annotated cases (`annotated`: per case
    name, the classes ``[C]`` bool its mask annotates) train with the marginal loss (`SoftDiceCELoss.marginal`)
    and are scored on their annotated classes only. `labelled` (prepared cases with true masks) joins `train`
    (pseudo-labels) in every batch of `batch_size`, `labelled_ratio` of it (`nakt.train.mixed`)."""

    def __init__(self, card: ModelCard, train, val, *, patch: tuple[int, ...] | None = None,
                 patches_per_case: int = 1, augment: bool = False, spatial_augment: bool = False,
                 min_confidence: float = 0.0, alpha: float = 0.5, pixel_weights: str = "none",
                 num_workers: int = 0, annotated: dict[str, np.ndarray] | None = None,
                 train_names: list[str] = (), val_names: list[str] = (), labelled=None,
                 labelled_ratio: float = 0.5, batch_size: int = 8, val_metric: str = "dice",
                 batch_dice: bool = False):
        self.card, self.val, self.alpha, self.pixel_weights = card, val, alpha, pixel_weights
        self.metric = "dice" if val_metric == "dice" else "pooled_dice"  # the name metrics.json records
        known = None
        if annotated:
            known = [torch.from_numpy(annotated.get(name, np.ones(card.classes, bool))) for name in train_names]
        self.val_known = [annotated.get(name) for name in val_names] if annotated else [None] * len(val)
        self.patch, self.patches_per_case = patch, patches_per_case
        self.min_confidence = min_confidence
        augmentation = Augmentation(card.spatial_dims, ("target", "weight"), flip=augment, intensity=augment,
                                    spatial=spatial_augment)
        self.samples = TrainingSamples(train, card.classes, augmentation, patch, known)
        self.mixing = None  # (pseudo-labelled samples, batch size, labelled share) when mixed with `labelled`
        if labelled is not None and len(labelled):
            self.mixing = (len(self.samples), batch_size, labelled_ratio)
            self.samples = MixedSamples(self.samples, TrainingSamples(labelled, card.classes, augmentation, patch),
                                        weighted=pixel_weights == "agreement")
        streamed = getattr(val, "streamed", False)
        self.val_loader = torch.utils.data.DataLoader(val, batch_size=None, num_workers=num_workers if streamed else 0,
                                                      persistent_workers=streamed and num_workers > 0)
        self.loss_fn = SoftDiceCELoss(batch_dice=batch_dice)

    def epoch_size(self) -> int:
        repeats = self.patches_per_case if self.patch else 1
        if self.mixing:
            pseudo, batch_size, ratio = self.mixing
            return mixed_epoch_size(pseudo * repeats, batch_size, ratio)
        return len(self.samples) * repeats

    def order(self, rng: np.random.Generator) -> np.ndarray:
        pseudo = len(self.samples) if self.mixing is None else self.mixing[0]
        order = np.concatenate([rng.permutation(pseudo) for _ in range(self.patches_per_case if self.patch else 1)])
        if self.mixing:
            _, batch_size, ratio = self.mixing
            order = mixed_order(order, len(self.samples) - pseudo, pseudo, batch_size, ratio, rng)
        return order

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        y, taught = batch.get("target"), batch.get("teacher_probs")
        if taught is not None:
            y = taught if y is None else self.alpha * taught + (1 - self.alpha) * y
        top = y.amax(1, keepdim=True)
        weight = None
        if self.pixel_weights == "confidence":
            weight = ((top - 1 / y.shape[1]) / (1 - 1 / y.shape[1])).clamp(0, 1)
        elif self.pixel_weights == "agreement":
            weight = batch["weight"].float()
        if self.min_confidence > 0:
            keep = (top >= self.min_confidence).float()
            weight = keep if weight is None else weight * keep
        return self.loss_fn(logits, y, weight, batch.get("known"))

    @torch.no_grad()
    def validate(self, model: NaktModel, precision: str = "fp32", batch_size: int = 8) -> float | None:
        """The validation score (`metric`) of the `val` cases, run in batches of same-shape images. 2D networks
        run channels-last here, as `nakt.batched` runs them for label, predict and evaluate, so that the score is
        the one ``nakt evaluate`` reports for these weights (reduced precision rounds differently per layout)."""
        if not len(self.val):
            return None
        model.eval()
        device = next(model.parameters()).device
        nhwc = self.card.spatial_dims == 2
        layout = torch.channels_last if nhwc else torch.contiguous_format
        model.to(memory_format=layout)
        classes, case_dice, index = self.card.classes, [], 0
        overlap, volume = np.zeros(classes), np.zeros(classes)  # per class, pooled
        for chunk in _same_shape_runs(self.val_loader, batch_size):
            x = torch.stack([case["image"] for case in chunk]).to(device).contiguous(memory_format=layout)
            with autocast(precision, device):
                probs = probs_on_grid(model, x)
            for case, predicted in zip(chunk, probs.argmax(1).cpu().numpy()):
                known, index = self.val_known[index], index + 1
                if known is not None:  # an unannotated class is background in the mask: not scored
                    predicted = np.where(known[predicted], predicted, 0)
                target = hard_target(case["target"]).numpy()
                if self.metric == "dice":
                    case_dice.append(case_scores(predicted, target, classes, hd95=False)["dice"])
                else:  # one pass over the pixels whatever the number of classes
                    overlap += np.bincount(predicted[predicted == target], minlength=classes)
                    volume += np.bincount(predicted.ravel(), minlength=classes)
                    volume += np.bincount(target.ravel(), minlength=classes)
        if nhwc and not channels_last_pays(device, 2):  # back to the layout the engine trains in
            model.to(memory_format=torch.contiguous_format)
        if self.metric == "dice":
            return float(np.mean(case_dice))
        seen = volume[1:] > 0  # a class absent from every validation case and never predicted is not scored
        return float(np.mean(2 * overlap[1:][seen] / volume[1:][seen])) if seen.any() else 1.0

    def encoder(self, model: NaktModel) -> list[str]:
        """An encoder-decoder net's (smp) encoder; other nets (MONAI's) have none to freeze."""
        encoder = getattr(model.net, "encoder", None)
        return [] if encoder is None else [f"net.encoder.{n}" for n, _ in encoder.named_parameters()]


def _same_shape_runs(cases, batch_size: int) -> Iterator[list[dict]]:
    """Consecutive prepared cases of one image shape, at most `batch_size` at a time (native-size patch models
    see images of many shapes)."""
    run: list[dict] = []
    for case in cases:
        if run and (len(run) == batch_size or case["image"].shape != run[0]["image"].shape):
            yield run
            run = []
        run.append(case)
    if run:
        yield run


def train_segmentation(opts) -> Path:
    """`nakt train --task segmentation`: `opts` is a `TrainOptions` with `masks` (a folder or a label set),
    `teacher` (online distillation; the teachers alone teach without `masks`), or both."""
    if opts.masks is None and not opts.teacher:
        raise NaktError(None, "missing option 'masks'", "give --masks DIR (or --teacher, or --task classification "
                        "--labels)")
    started = time.time()
    if parse_spec(opts.model)[0] not in ("run", "torchscript"):
        build_model(ModelCard(opts.model, 1, 2))  # an unknown architecture fails now, not after reading data
    masks = None if opts.masks is None else Path(opts.masks)
    soft_from = label_set = None
    if masks is not None and labelset.is_label_set(masks):
        label_set = masks
        soft_from = None if opts.hard_labels else masks
        masks = masks / "masks"
    orientation = _orientation(opts, label_set)
    classes = len(labelset.read_manifest(label_set)["label_values"]) if soft_from is not None else None
    if opts.pixel_weights == "agreement" and label_set is None:
        raise NaktError(opts.masks, "--pixel-weights agreement needs a label set as --masks (its teachers' "
                        "agreement maps)", "label with nakt label, or use --pixel-weights confidence")
    weights_from = label_set if opts.pixel_weights == "agreement" else None
    if opts.annotated_classes is not None and (label_set is not None or opts.teacher):
        raise NaktError(opts.annotated_classes, "--annotated-classes marks partially annotated true masks; "
                        f"{'a label set' if label_set is not None else 'an online teacher'} speaks for every class",
                        "give a masks folder, without --teacher")
    cases = discover_cases(opts.images, masks, opts.cases, opts.channels, opts.mask_file,
                           require_masks=masks is not None)
    infos = survey_cases(cases, orientation, opts.progress, soft_from, classes, weights_from)
    labelled_infos = _labelled_infos(opts, orientation)
    if masks is None and (opts.val_images is None or opts.val_masks is None):
        train_infos, val_infos = infos, []  # nothing to score against: the last epoch is kept
    elif opts.val_images is not None:
        val_cases = discover_cases(opts.val_images, opts.val_masks or masks, opts.val_cases,
                                   opts.channels, opts.mask_file, require_masks=True)
        train_infos, val_infos = infos, survey_cases(val_cases, orientation, opts.progress)
    else:
        train_infos, val_infos = split(infos, opts.val_fraction, opts.seed)

    net_teachers = load_net_teachers(opts.teacher or [])  # once: without masks their label values are the student's
    card, init_run = _card_for(opts, train_infos + val_infos, label_set,
                               teacher_space(net_teachers) if masks is None else None)
    extra = sorted(set(label_values_of(labelled_infos)) - set(card.label_values)) if labelled_infos else []
    if extra:
        raise NaktError(opts.labelled_masks, f"hold label values {extra} the student does not predict "
                        f"({card.label_values})", "store them with the label set's values")
    annotated = None
    if opts.annotated_classes is not None:
        annotated = annotated_classes(Path(opts.annotated_classes), card, train_infos + val_infos)
    model = build_student(opts, card, init_run)
    card = model.card  # with the network's size divisor
    teachers = online_teachers(net_teachers, card, next(model.parameters()).device, opts.teacher_mode,
                               opts.fusion, opts.seed) if net_teachers else None
    _check_grid(card, [info.spatial_shape for info in train_infos + labelled_infos])
    prepare_out(opts)
    budget = int(memory_cache_gb(opts) * 2**30)  # validation cases first: they are read every epoch
    read = {"orientation": orientation, "workers": opts.num_workers or 1, "progress": opts.progress}
    def disk(part: str) -> Path | None:
        return rundir.prepared_cases(opts.out, part) if opts.disk_cache else None

    val, held = cached_cases(val_infos, card, budget, disk=disk("val"), **read)
    train, train_held = cached_cases(train_infos, card, budget - held, disk=disk("train"), soft_from=soft_from,
                                     weights_from=weights_from, **read)
    labelled = cached_cases(labelled_infos, card, budget - held - train_held, disk=disk("labelled"),
                            **read)[0] if labelled_infos else None
    workers = loader_workers(opts.num_workers, train.streamed or val.streamed or bool(labelled and labelled.streamed))
    opts = dataclasses.replace(opts, num_workers=workers)
    patch = None
    if card.patch:
        patch = tuple(card.patch * card.spatial_dims if len(card.patch) == 1 else card.patch)
    elif opts.patches_per_case != type(opts).patches_per_case:  # the class attribute: the default
        print(f"nakt: --patches-per-case {opts.patches_per_case} is ignored: without --patch each case is one whole "
              "image per epoch (train longer with --epochs)", file=sys.stderr)
    record = record_of(opts)
    train_names, val_names = [i.case.name for i in train_infos], [i.case.name for i in val_infos]
    record.update(continued_from=init_run, soft_targets=soft_from is not None, trained_on=train_names,
                  validated_on=val_names, partially_annotated=len(annotated or {}),
                  labelled_on=[i.case.name for i in labelled_infos])
    task = SegmentationTask(card, train, val, patch=patch, patches_per_case=opts.patches_per_case,
                            augment=opts.augment, spatial_augment=opts.spatial_augment,
                            min_confidence=opts.min_confidence, alpha=opts.alpha, pixel_weights=opts.pixel_weights,
                            num_workers=opts.num_workers, annotated=annotated, train_names=train_names,
                            val_names=val_names, labelled=labelled, labelled_ratio=opts.labelled_ratio,
                            batch_size=opts.batch_size, val_metric=opts.val_metric, batch_dice=opts.batch_dice)
    return run_training(opts, card, model, task, record, teachers, started=started)


def _labelled_infos(opts, orientation: str) -> list[CaseInfo]:
    """The surveyed cases of ``--labelled-images`` / ``--labelled-masks`` (none without them)."""
    if opts.labelled_images is None and opts.labelled_masks is None and opts.labelled_cases is None:
        return []
    if opts.labelled_images is None or opts.labelled_masks is None:
        raise NaktError(None, "--labelled-images and --labelled-masks come together", "give both, or neither")
    if opts.masks is None:
        raise NaktError(None, "--labelled-images trains beside --masks (a label set)", "give --masks LABELSET")
    cases = discover_cases(opts.labelled_images, opts.labelled_masks, opts.labelled_cases, opts.channels,
                           opts.mask_file, require_masks=True)
    return survey_cases(cases, orientation, opts.progress)


def annotated_classes(path: Path, card: ModelCard, infos: list[CaseInfo]) -> dict[str, np.ndarray]:
    """Per partially annotated case, the classes its mask annotates, ``[C]`` bool over `card`'s classes (read
    by `nakt.io.tables.read_annotated_classes`; listed by value or name; background always). Refused: a listed
    case that is not among `infos`, a class the card does not have, a mask holding a class its row leaves
    out."""
    rows = tables.read_annotated_classes(path)
    by_name = {info.case.name: info for info in infos}
    index = {str(v): i for i, v in enumerate(card.label_values)}
    index.update({name: i for i, name in enumerate(card.class_names or [])})
    annotated = {}
    for case, listed in rows.items():
        if case not in by_name:
            raise NaktError(path, f"case {case!r} is not among the training or validation cases")
        known = np.ones(card.classes, bool)
        if listed is not None:
            missing = [c for c in listed if c not in index]
            if missing:
                raise NaktError(path, f"case {case!r}: class {missing[0]!r} is not one of the model's "
                                f"{card.label_values}", "list label values (or names) the masks use")
            known[:] = False
            known[[0, *(index[c] for c in listed)]] = True
            stray = [v for v in by_name[case].label_values if not known[card.label_values.index(v)]]
            if stray:
                raise NaktError(by_name[case].case.mask, f"holds label value {stray[0]}, which {path.name} "
                                f"does not list as annotated for {case!r}")
        annotated[case] = known
    return annotated


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


def _card_for(opts, infos: list[CaseInfo], label_set: Path | None,
              teachers: Unified | None = None) -> tuple[ModelCard, str | None]:
    """The model card: from the run being continued, or from the data (channels, classes, dimensions)
    unless `in_channels` / `label_values` are given. A label set's classes are its teachers' (from its
    manifest), soft or hard targets alike: its masks may never show a rare class; so are online teachers' (the
    union of their label spaces, `teachers`) when there are no masks."""
    if parse_spec(opts.model)[0] == "run":
        card, _ = rundir.read_config(Path(opts.model))
        return card, opts.model
    if opts.resume:  # the recorded card: the data could only rebuild the same one
        return rundir.read_config(Path(opts.out), require_complete=False)[0], None
    first = infos[0]
    for info in infos:
        if info.channels != first.channels or len(info.spatial_shape) != len(first.spatial_shape):
            raise NaktError(info.case.images[0], f"{info.channels} channel(s), {len(info.spatial_shape)}D; "
                            f"{first.case.name} has {first.channels}, {len(first.spatial_shape)}D")
    spatial_dims = len(first.spatial_shape)
    names_by_value: dict[int, str] = {}
    if teachers is not None:
        values = list(teachers.values)
        names_by_value = dict(zip(values, teachers.names))
    elif label_set is not None:
        manifest = labelset.read_manifest(label_set)
        values = [int(v) for v in manifest["label_values"]]
        names_by_value = dict(zip(values, manifest.get("class_names", [])))  # the teachers' names for the classes
        extra = sorted(set(label_values_of(infos)) - set(values))
        if extra:
            raise NaktError(label_set, f"masks hold label values {extra} missing from the manifest")
    else:
        values = label_values_of(infos)
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
    card = ModelCard(spec=opts.model, in_channels=opts.in_channels or first.channels, classes=len(values),
                     spatial_dims=spatial_dims, label_values=values, size=size, patch=patch,
                     class_names=[names_by_value.get(v, str(v)) for v in values],
                     normalization=opts.normalization, model_kwargs=dict(opts.model_kwargs),
                     orientation=opts.orientation)
    return card, None


def _check_grid(card: ModelCard, shapes: list[tuple[int, ...]]) -> None:
    """Each side the network sees must exceed its downsampling factor, or the deepest layer gets one pixel."""
    grids = [card.patch * card.spatial_dims if len(card.patch) == 1 else card.patch] if card.patch else [
        target_size(card, shape) for shape in shapes[:1]]
    for grid in grids:
        if min(grid) <= card.size_divisor:
            what = "--patch" if card.patch else "--size"
            raise NaktError(None, f"{what} {list(grid)} is too small for {card.spec}, which downsamples "
                            f"{card.size_divisor}x", f"use sides larger than {card.size_divisor}")
