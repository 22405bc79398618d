"""`nakt train` and `nakt finetune`: a model spec (or run) + images + masks or a label set -> run directory."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from nakt.classify.transfer import RECIPES
from nakt.errors import NaktError, look_up_option
from nakt.inference import pick_device
from nakt.io import labelset, rundir
from nakt.io.dataset import discover_cases
from nakt.models import ModelCard, build_model, load, parse_spec
from nakt.models.weights import load_pretrained
from nakt.train.data import label_values_of, make_samples, read_cases
from nakt.train.loop import fit

__all__ = ["FinetuneOptions", "TrainOptions", "finetune", "train"]


@dataclass
class TrainOptions:
    """Options of `train` (flag names of ``nakt train``; YAML configs use the same keys).

    `masks` is a masks folder or a label set written by ``nakt label`` (then its soft probabilities are the
    targets unless `hard_labels`). Without validation data, `val_fraction` of the cases is held out.
    With ``task="classification"``, `labels` (a CSV or a classification label set) or class folders under
    `images` give the targets; `head` is softmax, sigmoid (multi-label) or ordinal; `temperature` > 1
    distils a label set's soft probabilities (Hinton KD). Classification extras: `teacher` runs online
    distillation (`teacher_mode` ``random`` = RoS-KD, one teacher per step, or ``mean``; `alpha` weighs the
    teacher term against the labels), `ema` smooths the student, `subsets` K trains K teachers on overlapping
    random subsets (`subset_fraction` each) into ``out/subset_<k>``, `label_noise` flips that fraction of
    training labels, `balance_classes` draws each epoch's images with probability inversely proportional to
    their class's frequency (imbalanced tasks such as referable DR). Both tasks: `recipe="targeted"` uses
    discriminative learning rates with gradual unfreezing (one more layer group every `unfreeze_every` epochs);
    `init` starts from another run's weights (every tensor whose name and shape match).
    """

    model: str
    images: str
    out: str
    masks: str | None = None
    task: str = "segmentation"
    labels: str | None = None
    val_labels: str | None = None
    label_column: str | None = None
    head: str = "softmax"
    temperature: float = 1.0
    teacher: list[str] | None = None
    teacher_mode: str = "random"
    alpha: float = 0.5
    ema: float | None = None
    recipe: str | None = None
    unfreeze_every: int = 1
    init: str | None = None
    subsets: int = 0
    subset_fraction: float = 0.6
    label_noise: float = 0.0
    balance_classes: bool = False
    val_images: str | None = None
    val_masks: str | None = None
    cases: str | None = None
    val_cases: str | None = None
    channels: list[str] | None = None
    mask_file: str | None = None
    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    size: list[int] | None = None
    patch: list[int] | None = None
    patches_per_case: int = 4
    normalization: str = "zscore"
    in_channels: int | None = None
    label_values: list[int] | None = None
    hard_labels: bool = False
    min_confidence: float = 0.0
    augment: bool = True
    spatial_augment: bool = False
    val_fraction: float = 0.2
    freeze_encoder_epochs: int = 0
    pretrained: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True


@dataclass
class FinetuneOptions(TrainOptions):
    """`train` defaults for a small labelled set: a lower LR and the encoder frozen for the first epochs."""

    epochs: int = 20
    lr: float = 1e-4
    freeze_encoder_epochs: int = 5


def _split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    if fraction <= 0:
        return items, []
    if len(items) < 2:
        raise NaktError(None, f"{len(items)} training case(s): too few to hold out validation cases",
                        "give --val-images/--val-masks")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not (overwrite and rundir.is_run_dir(out)):
            raise NaktError(out, "output folder exists and is not empty",
                            "choose a new --out (or --overwrite to replace a run directory)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _card_for(opts: TrainOptions, items, label_set: Path | None) -> tuple[ModelCard, str | None]:
    """The model card: from the run being continued, or from the data (channels, classes, dimensions)
    unless `in_channels` / `label_values` are given. A label set's classes are its teachers' (from its
    manifest), soft or hard targets alike: its masks may never show a rare class."""
    if parse_spec(opts.model)[0] == "run":
        card, _ = rundir.read_config(Path(opts.model))
        return card, opts.model
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
                     normalization=opts.normalization, model_kwargs=dict(opts.model_kwargs))
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


# classification-only options with their defaults
CLASSIFICATION_ONLY = {"labels": None, "teacher": None, "ema": None, "subsets": 0, "label_noise": 0.0,
                       "balance_classes": False}


def train(opts: TrainOptions) -> Path:
    """Train a model spec (or continue a run) and write a run directory; returns its path."""
    look_up_option(opts.task, ("segmentation", "classification"), "task")
    if opts.recipe is not None:
        look_up_option(opts.recipe, RECIPES, "recipe")
    if opts.task == "classification":
        from nakt.classify.train import train_classifier

        return train_classifier(opts)
    misplaced = [name for name, default in CLASSIFICATION_ONLY.items() if getattr(opts, name) != default]
    if misplaced:  # silently ignoring them would hide a wrong --task
        flag = "--" + misplaced[0].replace("_", "-")
        raise NaktError(None, f"{flag} applies to classification only", "add --task classification or drop it")
    if opts.masks is None:
        raise NaktError(None, "missing option 'masks'", "give --masks DIR (or --task classification --labels)")
    started = time.time()
    out = Path(opts.out)
    if parse_spec(opts.model)[0] not in ("run", "torchscript"):
        build_model(ModelCard(opts.model, 1, 2))  # an unknown architecture fails now, not after reading data
    masks = Path(opts.masks)
    soft_from = label_set = None
    if labelset.is_label_set(masks):
        label_set = masks
        soft_from = None if opts.hard_labels else masks
        masks = masks / "masks"
    cases = discover_cases(opts.images, masks, opts.cases, opts.channels, opts.mask_file, require_masks=True)
    items = read_cases(cases, opts.progress)
    if opts.val_images is not None:
        val_cases = discover_cases(opts.val_images, opts.val_masks or masks, opts.val_cases,
                                   opts.channels, opts.mask_file, require_masks=True)
        train_items, val_items = items, read_cases(val_cases, opts.progress)
    else:
        train_items, val_items = _split(items, opts.val_fraction, opts.seed)

    card, init_run = _card_for(opts, train_items + val_items, label_set)
    _prepare_out(out, opts.overwrite)
    torch.manual_seed(opts.seed)
    if init_run is not None:
        model = load(init_run)
    else:
        model = build_model(card, pretrained=opts.pretrained)
    if opts.init:  # e.g. a model of the same body part: every tensor whose name and shape match
        load_pretrained(model, Path(opts.init) / rundir.WEIGHTS)
    _check_grid(card, [image.spatial_shape for _, image, _ in train_items])
    model.to(pick_device(opts.device))
    train_samples = make_samples(train_items, card, soft_from)
    val_samples = make_samples(val_items, card)
    patch = None
    if card.patch:
        patch = tuple(card.patch * card.spatial_dims if len(card.patch) == 1 else card.patch)
    record = {k: v for k, v in asdict(opts).items() if k not in ("progress",)}
    record.update(init=init_run, soft_targets=soft_from is not None, train_cases=[s.name for s in train_samples],
                  val_cases=[s.name for s in val_samples])
    rundir.write_config(out, card, record)
    metrics = fit(model, train_samples, val_samples, out, epochs=opts.epochs, batch_size=opts.batch_size,
                  lr=opts.lr, weight_decay=opts.weight_decay, seed=opts.seed, patch=patch,
                  patches_per_case=opts.patches_per_case, augment=opts.augment,
                  spatial_augment=opts.spatial_augment,
                  freeze_encoder_epochs=opts.freeze_encoder_epochs, min_confidence=opts.min_confidence,
                  recipe=opts.recipe, unfreeze_every=opts.unfreeze_every, progress=opts.progress)
    rundir.write_metrics(out, {**metrics, "wall_seconds": round(time.time() - started, 1)})
    return out


def finetune(opts: FinetuneOptions) -> Path:
    """Continue training a run directory on a (small) labelled set; writes a new run directory."""
    if parse_spec(opts.model)[0] != "run":
        raise NaktError(opts.model, "finetune continues a run directory", "train a model with nakt train first")
    return train(opts)
