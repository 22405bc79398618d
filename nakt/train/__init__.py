"""`nakt train` and `nakt finetune`: a model spec (or run) + images + masks or a label set -> run directory."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from nakt.classify.transfer import RECIPES
from nakt.config import at_least, between, check_device, check_options, check_orientation, one_of
from nakt.errors import NaktError
from nakt.inference import pick_device
from nakt.io import labelset, outputs, rundir
from nakt.io.dataset import discover_cases
from nakt.models import ModelCard, build_model, load, parse_spec
from nakt.models.weights import load_pretrained
from nakt.train.data import label_values_of, make_samples, read_cases
from nakt.train.loop import fit

__all__ = ["FinetuneOptions", "TrainOptions", "finetune", "infer_task", "resume_options", "train"]

TASKS = ("segmentation", "classification")
# value checks of TrainOptions (types come from the annotations); run before any data is read
TRAIN_CHECKS = {
    "task": one_of(*TASKS), "head": one_of("softmax", "sigmoid", "ordinal"), "teacher_mode": one_of("random", "mean"),
    "recipe": one_of(*RECIPES), "normalization": one_of("zscore", "minmax", "none"), "device": check_device,
    "epochs": at_least(1), "batch_size": at_least(1), "lr": at_least(0, exclusive=True),
    "weight_decay": at_least(0), "temperature": at_least(0, exclusive=True), "alpha": between(0, 1),
    "ema": between(0, 1), "unfreeze_every": at_least(1), "subsets": at_least(0),
    "subset_fraction": between(0, 1, low_open=True), "label_noise": between(0, 1, high_open=True),
    "size": at_least(1), "patch": at_least(1), "patches_per_case": at_least(1), "in_channels": at_least(1),
    "min_confidence": between(0, 1), "val_fraction": between(0, 1, high_open=True),
    "freeze_encoder_epochs": at_least(0), "seed": at_least(0), "orientation": check_orientation,
}


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

    `task` is inferred when not given (`infer_task`). 3D volumes are reoriented to `orientation` (a nibabel
    axcode such as ``RAS``, or ``none`` for storage order) before the network sees them; the model card records
    it. `resume` continues an interrupted run in `out` from its last finished epoch (`resume_options`).
    """

    model: str
    images: str
    out: str
    masks: str | None = None
    task: str | None = None
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
    orientation: str = "RAS"
    device: str = "auto"
    overwrite: bool = False
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_options(self, TRAIN_CHECKS)
        if self.size is not None and len(self.size) not in (1, 2, 3):
            raise NaktError(None, f"--size takes 1, 2 or 3 numbers, got {len(self.size)}")
        if self.patch is not None and len(self.patch) not in (1, 2, 3):
            raise NaktError(None, f"--patch takes 1, 2 or 3 numbers, got {len(self.patch)}")
        if self.resume and self.overwrite:
            raise NaktError(None, "--resume continues a run, --overwrite replaces it", "give one of them")


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


def _prepare_out(opts: TrainOptions) -> None:
    """Claim the run directory: a new or empty folder, or (with --overwrite) a run of nakt's own. With --resume
    the folder must hold an unfinished run (checked by `resume_options`)."""
    if not opts.resume:
        outputs.claim_output(opts.out, outputs.RUN, opts.overwrite)


def infer_task(opts: TrainOptions) -> str:
    """The task when `--task` is not given: a run's own, classification for classifier specs (``timm:``,
    ``torchvision:``) or `labels` without `masks`, else segmentation. A given task that contradicts the spec
    or the run is an error."""
    scheme, rest = parse_spec(opts.model)
    implied = None
    if scheme == "run":
        implied = rundir.read_config(Path(rest))[0].task
    elif scheme in ("timm", "torchvision"):
        implied = "classification"
    elif scheme in ("smp", "monai"):
        implied = "segmentation"
    if opts.task is not None and implied is not None and opts.task != implied:
        raise NaktError(opts.model, f"is a {implied} model, not {opts.task}", f"use --task {implied} or drop --task")
    if opts.task is not None:
        return opts.task
    if implied is not None:
        return implied
    return "classification" if opts.labels is not None and opts.masks is None else "segmentation"


# fields that describe how to run, not what is trained: a resumed run may change them
_RUN_ONLY = {"resume", "progress", "device", "overwrite"}


def resume_options(out: str | Path, given: dict, cls: type[TrainOptions] = TrainOptions) -> TrainOptions:
    """Options of the unfinished run in `out`, read back from its config.json, for ``--resume``.

    `given` may repeat the original options (``nakt train <same flags> --resume``) or hold only ``out``; a value
    that differs from the recorded one is refused, since the run could not end as an uninterrupted one would.
    """
    out = Path(out)
    if outputs.holds_output(out, outputs.SUBSET_RUNS):  # RoS-KD subset teachers: the record is the parent's
        record = rundir.read_json(out / outputs.SUBSET_RUNS.marker).get("training", {})
    elif outputs.holds_output(out, outputs.RUN):
        _, record = rundir.read_config(out, require_complete=False)
        if rundir.is_complete(out):
            raise NaktError(out, "training finished already: nothing to resume", "use it, or --overwrite to retrain")
    else:
        raise NaktError(out, "is not a run directory: nothing to resume", "start it with nakt train (no --resume)")
    names = {f.name for f in fields(cls)}
    recorded = {k: v for k, v in record.items() if k in names and k not in _RUN_ONLY}
    for key, value in given.items():
        if value is None or key in _RUN_ONLY or key not in recorded or key == "out":
            continue
        if _normal(value) != _normal(recorded[key]):
            raise NaktError(out, f"--{key.replace('_', '-')} {value!r} differs from the interrupted run's "
                            f"{recorded[key]!r}", "resume with the original options (or only --out and --resume)")
    extra = {k: v for k, v in given.items() if k in _RUN_ONLY and v is not None}
    return cls(**{**recorded, **extra, "out": str(out), "resume": True})


def _normal(value):
    """Compare option values as they are recorded in JSON (paths as strings, tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _orientation(opts: TrainOptions, label_set: Path | None) -> str:
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


def _card_for(opts: TrainOptions, items, label_set: Path | None) -> tuple[ModelCard, str | None]:
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


# classification-only options with their defaults
CLASSIFICATION_ONLY = {"labels": None, "teacher": None, "ema": None, "subsets": 0, "label_noise": 0.0,
                       "balance_classes": False}


def train(opts: TrainOptions) -> Path:
    """Train a model spec (or continue a run) and write a run directory; returns its path.

    config.json is written first and marked complete only when training ends; until then `nakt.load` refuses
    the run and ``resume=True`` continues it from its last finished epoch.
    """
    opts.task = infer_task(opts)
    if opts.init is not None:
        rundir.read_config(Path(opts.init))  # an unfinished or foreign --init fails now, with its reason
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
    orientation = _orientation(opts, label_set)
    cases = discover_cases(opts.images, masks, opts.cases, opts.channels, opts.mask_file, require_masks=True)
    items = read_cases(cases, opts.progress, orientation)
    if opts.val_images is not None:
        val_cases = discover_cases(opts.val_images, opts.val_masks or masks, opts.val_cases,
                                   opts.channels, opts.mask_file, require_masks=True)
        train_items, val_items = items, read_cases(val_cases, opts.progress, orientation)
    else:
        train_items, val_items = _split(items, opts.val_fraction, opts.seed)

    card, init_run = _card_for(opts, train_items + val_items, label_set)
    torch.manual_seed(opts.seed)
    if init_run is not None:
        model = load(init_run)
    else:
        model = build_model(card, pretrained=opts.pretrained)
    if opts.init:  # e.g. a model of the same body part: every tensor whose name and shape match
        load_pretrained(model, Path(opts.init) / rundir.WEIGHTS)
    _check_grid(card, [image.spatial_shape for _, image, _ in train_items])
    _prepare_out(opts)
    model.to(pick_device(opts.device))
    train_samples = make_samples(train_items, card, soft_from)
    val_samples = make_samples(val_items, card)
    patch = None
    if card.patch:
        patch = tuple(card.patch * card.spatial_dims if len(card.patch) == 1 else card.patch)
    record = {k: v for k, v in asdict(opts).items() if k not in _RUN_ONLY}
    record.update(continued_from=init_run, soft_targets=soft_from is not None,
                  trained_on=[s.name for s in train_samples], validated_on=[s.name for s in val_samples])
    if not opts.resume:
        rundir.write_config(out, card, record, complete=False)
    metrics = fit(model, train_samples, val_samples, out, epochs=opts.epochs, batch_size=opts.batch_size,
                  lr=opts.lr, weight_decay=opts.weight_decay, seed=opts.seed, patch=patch,
                  patches_per_case=opts.patches_per_case, augment=opts.augment,
                  spatial_augment=opts.spatial_augment,
                  freeze_encoder_epochs=opts.freeze_encoder_epochs, min_confidence=opts.min_confidence,
                  recipe=opts.recipe, unfreeze_every=opts.unfreeze_every, progress=opts.progress,
                  resume=has_epochs_to_resume(out, opts.resume))
    finish_run(out, card, record, metrics, started, opts.resume)
    return out


def has_epochs_to_resume(out: Path, resume: bool) -> bool:
    """With --resume, whether a finished epoch was saved; a run stopped during its first epoch starts over."""
    from nakt.train.checkpoint import read_training_state

    return resume and read_training_state(out) is not None


def finish_run(out: Path, card: ModelCard, record: dict, metrics: dict, started: float, resumed: bool) -> None:
    """Mark a run complete: wall time into metrics.json, ``complete`` into config.json, the resume state gone.
    (A resumed run's ``wall_seconds`` counts the resuming process only; ``resumed`` says so.)"""
    from nakt.train.checkpoint import clear_training_state

    rundir.write_metrics(out, {**metrics, "wall_seconds": round(time.time() - started, 1), "resumed": resumed})
    rundir.write_config(out, card, record, complete=True)
    clear_training_state(out)


def finetune(opts: FinetuneOptions) -> Path:
    """Continue training a run directory on a (small) labelled set; writes a new run directory."""
    if parse_spec(opts.model)[0] != "run":
        raise NaktError(opts.model, "finetune continues a run directory", "train a model with nakt train first")
    return train(opts)
