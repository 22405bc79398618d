"""Classification for the training engine: `ClassificationTask` (batches of prepared images with class
probability targets, Hinton KD loss against labels and online teachers, validation macro AUC) and
`train_classifier`, which reads the labels, builds the model card and runs the engine; `subsets` K trains RoS-KD
teachers instead.

Targets are always class probabilities (one-hot for hard labels) and the loss is `kd_loss`, so a student trained
on a label set with ``temperature > 1`` is distilled, and one trained on hard labels gets plain cross-entropy.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from nakt.classify.data import LabelTable, read_labels
from nakt.classify.losses import kd_loss
from nakt.classify.metrics import classification_scores
from nakt.classify.prepared import LazyImages, class_balanced_weights, predict_probs, target_probs, training_images
from nakt.classify.roskd import flip_labels, overlapping_subsets
from nakt.classify.transfer import layer_groups
from nakt.errors import NaktError
from nakt.io import outputs, rundir
from nakt.io.dataset import write_case_list
from nakt.io.images import read_image
from nakt.models import ModelCard, NaktModel, parse_spec
from nakt.train.augment import Augmentation
from nakt.train.online import load_online_teachers
from nakt.train.setup import build_student, loader_workers, memory_cache_gb, prepare_out, record_of, run_training, split

__all__ = ["ClassificationSamples", "ClassificationTask", "OPTIONS", "train_classifier"]

# options only classification takes: `nakt.train.train` refuses them for another task
OPTIONS = ("labels", "val_labels", "label_column", "head", "temperature", "subsets", "subset_fraction", "label_noise",
           "balance_classes")


class ClassificationTask:
    """Prepared images ``[N, C_in, H, W]`` (float16, in memory or `LazyImages`) with targets ``[N, C]`` (class
    probabilities) drawn as samples ``{"image": [C_in, H, W], "target": [C]}`` (`ClassificationSamples`), in a
    random order or, with `balance_classes`, with every class equally likely; `augment` flips half of them.
    The loss is `kd_loss` at `temperature` against the targets or, with online teachers, ``alpha`` on the
    teachers' probabilities and the rest on the targets; images whose target's top probability is below
    `min_confidence` are left out of it. The score is the validation macro AUC (accuracy where AUC is undefined)."""

    metric = "auc"

    def __init__(self, card: ModelCard, x_train: torch.Tensor | LazyImages, y_train: torch.Tensor,
                 x_val: torch.Tensor | LazyImages, val_table: LabelTable, *, augment: bool = False,
                 balance_classes: bool = False, temperature: float = 1.0, alpha: float = 0.5,
                 min_confidence: float = 0.0):
        self.card, self.x_val, self.val_table = card, x_val, val_table
        self.temperature, self.alpha, self.min_confidence = temperature, alpha, min_confidence
        self.samples = ClassificationSamples(x_train, y_train, Augmentation(2, flip=augment, intensity=False))
        self.balance = class_balanced_weights(y_train) if balance_classes else None

    def epoch_size(self) -> int:
        return len(self.samples)

    def order(self, rng: np.random.Generator) -> np.ndarray:
        n = len(self.samples)
        return rng.choice(n, n, p=self.balance) if self.balance is not None else rng.permutation(n)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        y, soft = batch["target"], batch.get("teacher_probs")
        if self.min_confidence > 0:
            keep = y.amax(1) >= self.min_confidence
            if not keep.any():
                return logits.sum() * 0.0  # nothing confident in this batch: no update, same graph
            logits, y = logits[keep], y[keep]
            soft = soft[keep] if soft is not None else None
        if soft is not None:
            return kd_loss(logits, soft, self.card.head, self.temperature, self.alpha, hard_probs=y)
        return kd_loss(logits, y, self.card.head, temperature=self.temperature)

    def validate(self, model: NaktModel, precision: str = "fp32", batch_size: int = 64) -> float | None:
        if not len(self.x_val):
            return None
        probs = predict_probs(model, self.x_val, max(batch_size, 64), precision)
        table = self.val_table
        labels = table.targets.argmax(1) if table.kind == "probs" else table.targets.astype(int)
        mean = classification_scores(probs, labels)["mean"]
        return mean["auc"] if mean["auc"] is not None else mean["accuracy"]

    def encoder(self, model: NaktModel) -> list[str]:
        """Every layer group but the head (`layer_groups`: the classifier of timm and torchvision nets)."""
        return [name for group in layer_groups(model)[:-1] for name in group]


class ClassificationSamples(torch.utils.data.Dataset):
    """``samples[(index, seed)]``: prepared image `index` (float32) augmented from `seed`, with its target."""

    def __init__(self, images: torch.Tensor | LazyImages, targets: torch.Tensor, augmentation: Augmentation):
        self.images, self.targets, self.augmentation = images, targets, augmentation

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = item
        return self.augmentation({"image": self.images[[index]][0].float(), "target": self.targets[index]}, seed)


def train_classifier(opts) -> Path:
    """`nakt train --task classification`: `opts` is a `TrainOptions` with `labels` (CSV or label set) or
    class folders under `images`. With ``subsets`` K, trains K teachers on overlapping subsets instead."""
    if opts.subsets:
        return _train_subsets(opts)
    started = time.time()
    table = read_labels(opts.images, opts.labels, opts.cases, opts.label_column)
    if opts.val_images is not None:
        train_idx = list(range(len(table.images)))
        val_table = read_labels(opts.val_images, opts.val_labels, opts.val_cases, opts.label_column)
    else:
        train_idx, val_idx = split(list(range(len(table.images))), opts.val_fraction, opts.seed)
        val_table = table.subset(val_idx)
    train_table = table.subset(train_idx)
    if opts.balance_classes and table.kind == "multihot":
        raise NaktError(opts.labels, "--balance-classes needs one class per image, not multi-label findings")
    card = _card(opts, table)
    if val_table.class_names != card.class_names:
        raise NaktError(opts.val_labels or opts.images, f"classes {val_table.class_names} differ from the "
                        f"training classes {card.class_names}")
    prepare_out(opts)
    model = build_student(opts, card, opts.model if parse_spec(opts.model)[0] == "run" else None)
    card = dataclasses.replace(card, size_divisor=model.card.size_divisor)  # the network's
    teachers = load_online_teachers(opts.teacher, card, next(model.parameters()).device, opts.teacher_mode,
                                    opts.fusion, opts.seed) if opts.teacher else None
    cache = int(memory_cache_gb(opts) * 2**30)
    x_val = training_images(val_table, card, opts.progress, cache)  # validation first: read every epoch
    held = x_val.element_size() * x_val.nelement() if isinstance(x_val, torch.Tensor) else 0
    x_train = training_images(train_table, card, opts.progress, cache - held)
    streamed = not isinstance(x_train, torch.Tensor) or not isinstance(x_val, torch.Tensor)
    opts = dataclasses.replace(opts, num_workers=loader_workers(opts.num_workers, streamed))
    task = ClassificationTask(card, x_train, _targets_for_training(train_table, opts), x_val, val_table,
                              augment=opts.augment, balance_classes=opts.balance_classes,
                              temperature=opts.temperature, alpha=opts.alpha, min_confidence=opts.min_confidence)
    record = record_of(opts)
    record.update(soft_targets=train_table.kind == "probs", trained_on=train_table.keys, validated_on=val_table.keys)
    return run_training(opts, card, model, task, record, teachers, started)


def _card(opts, table: LabelTable) -> ModelCard:
    if opts.resume:  # the recorded card: the data could only rebuild the same one
        return rundir.read_config(Path(opts.out), require_complete=False)[0]
    if parse_spec(opts.model)[0] == "run":
        card, _ = rundir.read_config(Path(opts.model))
        if card.task != "classification":
            raise NaktError(opts.model, "is a segmentation run", "use --task segmentation")
        return card
    first = read_image(table.images[0])
    head = opts.head if table.kind != "multihot" else "sigmoid"
    return ModelCard(spec=opts.model, in_channels=opts.in_channels or first.array.shape[0],
                     classes=len(table.class_names), spatial_dims=2, task="classification", size=opts.size or [128],
                     normalization=opts.normalization, model_kwargs=dict(opts.model_kwargs), head=head,
                     class_names=table.class_names)


def _targets_for_training(table: LabelTable, opts) -> torch.Tensor:
    if opts.label_noise > 0:
        if table.kind != "index":
            raise NaktError(opts.labels, "--label-noise needs one class label per image")

        table = LabelTable(table.images, table.keys, flip_labels(table.targets, len(table.class_names),
                                                                  opts.label_noise, opts.seed),
                           table.class_names, table.kind)
    return target_probs(table)


def _train_subsets(opts) -> Path:
    """RoS-KD teachers: K runs ``out/subset_<k>``, each on an overlapping random subset of the training data."""
    import dataclasses


    table = read_labels(opts.images, opts.labels, opts.cases, opts.label_column)
    out = Path(opts.out)
    resuming = outputs.claim_output(out, outputs.SUBSET_RUNS, opts.overwrite, resume=opts.resume)
    if opts.resume and not resuming:
        raise NaktError(out, "holds no subset runs: nothing to resume", "start it without --resume")
    record = record_of(opts)
    rundir.write_json(out / outputs.SUBSET_RUNS.marker, {"format": "nakt.subsets/1", "training": record})
    for k, subset in enumerate(overlapping_subsets(len(table.keys), opts.subsets, opts.subset_fraction, opts.seed)):
        run = out / f"subset_{k}"
        if opts.resume and outputs.holds_output(run, outputs.RUN) and rundir.is_complete(run):
            continue  # finished before the interruption
        cases = write_case_list(out / f"subset_{k}.txt", [table.keys[i] for i in subset])
        resume = opts.resume and outputs.holds_output(run, outputs.RUN)
        train_classifier(dataclasses.replace(opts, subsets=0, cases=str(cases), out=str(run), seed=opts.seed + k,
                                             resume=resume, overwrite=False))
    return out
