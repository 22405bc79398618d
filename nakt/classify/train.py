"""Training classifiers: from labels (CSV or class folders) or a teacher label set of class probabilities.

Targets are always class probabilities (one-hot for hard labels), and the loss is Hinton KD (`kd_loss`), so a
student trained on a label set with ``temperature > 1`` is distilled, and one trained on hard labels is trained
with plain cross-entropy. The best epoch by validation macro AUC is kept.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nakt.classify.data import LabelTable, read_labels
from nakt.classify.losses import kd_loss
from nakt.classify.metrics import classification_scores
from nakt.errors import NaktError
from nakt.inference import pick_device
from nakt.io import rundir
from nakt.io.images import read_image
from nakt.models import ModelCard, NaktModel, build_model, load, parse_spec
from nakt.preprocess import prepare_image
from nakt.train.checkpoint import BestEpoch, TrainingState

__all__ = ["load_images", "LazyImages", "training_images", "target_probs", "predict_probs", "class_balanced_weights",
           "train_classifier"]


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
def predict_probs(model: NaktModel, images: torch.Tensor | LazyImages, batch_size: int = 64) -> np.ndarray:
    """Class probabilities ``[N, C]`` for prepared images ``[N, C_in, H, W]``."""
    model.eval()
    device = next(model.parameters()).device
    parts = [model.predict_proba(images[i:i + batch_size].float().to(device)).cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(parts).numpy()


def _score(model: NaktModel, images: torch.Tensor | LazyImages, table: LabelTable) -> float:
    probs = predict_probs(model, images)
    labels = table.targets if table.kind != "probs" else table.targets.argmax(1)
    mean = classification_scores(probs, labels.astype(int) if table.kind != "probs" else labels)["mean"]
    return mean["auc"] if mean["auc"] is not None else mean["accuracy"]


def class_balanced_weights(targets: torch.Tensor) -> np.ndarray:
    """Sampling probabilities ``[N]`` giving every class (the argmax of the targets ``[N, C]``) the same total."""
    classes = targets.argmax(1).numpy()
    counts = np.bincount(classes)
    weights = 1.0 / counts[classes]
    return weights / weights.sum()


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
        from nakt.classify.roskd import flip_labels

        table = LabelTable(table.images, table.keys, flip_labels(table.targets, len(table.class_names),
                                                                  opts.label_noise, opts.seed),
                           table.class_names, table.kind)
    return target_probs(table)


def _teachers(opts, card: ModelCard, device) -> list[NaktModel]:
    teachers = [load(t).to(device).eval() for t in opts.teacher or []]
    for spec, t in zip(opts.teacher or [], teachers):
        if t.card.class_names != card.class_names or t.card.size != card.size:
            raise NaktError(spec, f"teacher classes {t.card.class_names} / size {t.card.size} differ from the "
                            f"student's {card.class_names} / {card.size}", "online teachers see the student's batch")
    return teachers


def train_classifier(opts) -> Path:
    """`nakt train --task classification`: `opts` is a `TrainOptions` with `labels` (CSV or label set) or
    class folders under `images`. With ``subsets`` K, trains K teachers on overlapping subsets instead."""
    if opts.subsets:
        return _train_subsets(opts)
    from nakt.train import _RUN_ONLY, _prepare_out, _split, finish_run, has_epochs_to_resume

    started = time.time()
    table = read_labels(opts.images, opts.labels, opts.cases, opts.label_column)
    if opts.val_images is not None:
        train_idx = list(range(len(table.images)))
        val_table = read_labels(opts.val_images, opts.val_labels, opts.val_cases, opts.label_column)
    else:
        train_idx, val_idx = _split(list(range(len(table.images))), opts.val_fraction, opts.seed)
        val_table = table.subset(val_idx)
    train_table = table.subset(train_idx)
    if opts.balance_classes and table.kind == "multihot":
        raise NaktError(opts.labels, "--balance-classes needs one class per image, not multi-label findings")
    card = _card(opts, table)
    if val_table.class_names != card.class_names:
        raise NaktError(opts.val_labels or opts.images, f"classes {val_table.class_names} differ from the "
                        f"training classes {card.class_names}")
    _prepare_out(opts)
    torch.manual_seed(opts.seed)
    model = load(opts.model) if parse_spec(opts.model)[0] == "run" else build_model(card, pretrained=opts.pretrained)
    if opts.init:
        from nakt.models.weights import load_pretrained

        load_pretrained(model, Path(opts.init) / rundir.WEIGHTS)
    device = pick_device(opts.device)
    model.to(device)
    teachers = _teachers(opts, card, device)
    x_train, y_train = training_images(train_table, card, opts.progress), _targets_for_training(train_table, opts)
    x_val = training_images(val_table, card, opts.progress)
    record = {k: v for k, v in vars(opts).items() if k not in _RUN_ONLY}
    record.update(soft_targets=train_table.kind == "probs", trained_on=train_table.keys, validated_on=val_table.keys)
    if not opts.resume:
        rundir.write_config(Path(opts.out), card, record, complete=False)
    _fit(model, teachers, x_train, y_train, x_val, val_table, Path(opts.out), opts,
         resume=has_epochs_to_resume(Path(opts.out), opts.resume))
    finish_run(Path(opts.out), card, record, rundir.read_metrics(Path(opts.out)), started, opts.resume)
    return Path(opts.out)


def _fit(model: NaktModel, teachers: list[NaktModel], x_train: torch.Tensor | LazyImages, y_train: torch.Tensor,
         x_val: torch.Tensor | LazyImages, val_table: LabelTable, run: Path, opts, resume: bool = False) -> None:
    """The loop: KD loss against labels (and teachers), one-cycle LR, optional unfreezing and EMA; keeps the
    best epoch by validation AUC in ``run/model.safetensors``.

    After every epoch, ``run/training_state.pt`` keeps what continuing needs (`TrainingState`: the model, its
    EMA, optimizer, schedule, the batch and teacher-draw generators, the best-so-far); with `resume`, the loop
    restores it and goes on from the next epoch as if never stopped (the model, data and teachers rebuilt as
    the first run had them)."""
    from nakt.classify.roskd import TeacherSampler, ema_model
    from nakt.classify.transfer import apply_unfreezing, make_optimizer

    device, head = next(model.parameters()).device, model.card.head
    rng = np.random.default_rng(opts.seed)
    sampler = TeacherSampler(len(teachers), opts.teacher_mode, opts.seed) if teachers else None
    optimizer = make_optimizer(model, opts.lr, opts.weight_decay, opts.recipe)
    n = len(x_train)
    steps = max(1, math.ceil(n / opts.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=opts.epochs * steps + 1)
    smoothed = ema_model(model, opts.ema) if opts.ema else None
    balance = class_balanced_weights(y_train) if opts.balance_classes else None
    log = BestEpoch(run, opts.epochs, "auc", "best_val_score", {"best_val_metric": "auc"}, opts.progress)
    generators = {"batches": rng} if sampler is None else {"batches": rng, "teachers": sampler.rng}
    state = TrainingState(run, opts.epochs, log, {"model": model, "ema": smoothed, "optimizer": optimizer,
                                                  "schedule": schedule}, generators)
    scored = smoothed.module if smoothed is not None else model
    done = state.resume(scored) if resume else 0
    for epoch in range(done + 1, opts.epochs + 1):
        t0 = time.time()
        model.train()
        unfrozen = apply_unfreezing(model, epoch, opts.unfreeze_every) if opts.recipe == "targeted" else None
        losses = []
        order = rng.choice(n, n, p=balance) if balance is not None else rng.permutation(n)
        for start in range(0, len(order), opts.batch_size):
            idx = order[start:start + opts.batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            x, y = x_train[idx].float().to(device), y_train[idx].to(device)
            if opts.augment:
                flip = torch.as_tensor(rng.random(len(idx)) < 0.5, device=device)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            logits = model(x)
            if teachers:  # online: the drawn teacher(s) see the same augmented batch
                with torch.no_grad():
                    soft = torch.stack([teachers[k].predict_proba(x) for k in sampler.draw()]).mean(0)
                loss = kd_loss(logits, soft, head, opts.temperature, opts.alpha, hard_probs=y)
            else:
                loss = kd_loss(logits, y, head, temperature=opts.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if smoothed is not None:
                smoothed.update_parameters(model)
            losses.append(loss.item())
        score = _score(scored, x_val, val_table) if len(x_val) else None
        log.update(scored, {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
                            "val_score": score, "unfrozen_groups": unfrozen, "seconds": round(time.time() - t0, 2)},
                   score, state=state)
    model.requires_grad_(True)


def _train_subsets(opts) -> Path:
    """RoS-KD teachers: K runs ``out/subset_<k>``, each on an overlapping random subset of the training data."""
    import dataclasses

    from nakt.classify.roskd import overlapping_subsets
    from nakt.io import outputs

    table = read_labels(opts.images, opts.labels, opts.cases, opts.label_column)
    out = Path(opts.out)
    resuming = outputs.claim_output(out, outputs.SUBSET_RUNS, opts.overwrite, resume=opts.resume)
    if opts.resume and not resuming:
        raise NaktError(out, "holds no subset runs: nothing to resume", "start it without --resume")
    from nakt.train import _RUN_ONLY

    record = {k: v for k, v in vars(opts).items() if k not in _RUN_ONLY}
    rundir.write_json(out / outputs.SUBSET_RUNS.marker, {"format": "nakt.subsets/1", "training": record})
    for k, subset in enumerate(overlapping_subsets(len(table.keys), opts.subsets, opts.subset_fraction, opts.seed)):
        run = out / f"subset_{k}"
        if opts.resume and outputs.holds_output(run, outputs.RUN) and rundir.is_complete(run):
            continue  # finished before the interruption
        cases = out / f"subset_{k}.txt"
        with outputs.atomic_path(cases) as tmp:
            tmp.write_text("\n".join(table.keys[i] for i in subset) + "\n")
        resume = opts.resume and outputs.holds_output(run, outputs.RUN)
        train_classifier(dataclasses.replace(opts, subsets=0, cases=str(cases), out=str(run), seed=opts.seed + k,
                                             resume=resume, overwrite=False))
    return out
