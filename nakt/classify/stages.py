"""The classification side of `label`, `predict` and `evaluate` (dispatched to by those verbs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nakt.classify.data import LABELS_CSV, LabelTable, list_images, read_labels, restrict
from nakt.classify.metrics import classification_scores
from nakt.classify.prepared import load_images, predict_probs
from nakt.classify.robustness import attack_images
from nakt.errors import NaktError
from nakt.fold import fold_batchnorm
from nakt.fusion import fuse
from nakt.inference import pick_device
from nakt.io import labelset, outputs
from nakt.io.predictions import begin_predictions, end_predictions
from nakt.io.summary import write_summary
from nakt.io.tables import write_class_table
from nakt.models import NaktModel, load
from nakt.version import __version__

__all__ = ["label_classification", "predict_classification", "evaluate_classification", "table_probs"]

CHUNK = 512  # images read and prepared at once: memory stays bounded on unlabelled pools of any size


def table_probs(model: NaktModel, table: LabelTable, progress: bool = True, attack: tuple | None = None,
                chunk: int = CHUNK) -> np.ndarray:
    """Class probabilities ``[N, C]`` for every image of `table`, read `chunk` images at a time.

    `attack` = ``(method, eps, steps)`` scores adversarial versions of the images instead (labels from `table`).
    """
    from tqdm import tqdm


    parts = []
    with tqdm(total=len(table.images), desc="predict", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(table.images), chunk):
            part = table.subset(list(range(start, min(start + chunk, len(table.images)))))
            images = load_images(part, model.card, progress=False)
            if attack:
                images = attack_images(model, images, part, *attack)
            parts.append(predict_probs(model, images))
            bar.update(len(part.images))
    return np.concatenate(parts)


def _unlabelled(images: str, cases) -> LabelTable:
    """Every image under `images` (restricted to `cases`), without targets."""
    root = Path(images)
    files = list_images(root)
    table = LabelTable(files, [p.relative_to(root).as_posix() for p in files], np.zeros(len(files)), [], "index")
    return restrict(table, cases, root)


def _teacher_probs(models: list[NaktModel], table: LabelTable, progress: bool) -> np.ndarray:
    """``[K, N, C]``: every teacher with its own preprocessing."""
    return np.stack([table_probs(m, table, progress) for m in models])


def label_classification(opts, weights: list[float] | None) -> Path:
    """Teachers' fused class probabilities for every image -> ``labels.csv`` + ``manifest.json``."""
    if opts.fusion == "staple":
        raise NaktError(None, "STAPLE fuses segmentations", "use --fusion mean, weighted or vote")
    device = pick_device(opts.device)
    models = [load(t) for t in opts.teacher]
    folded = [fold_batchnorm(m) for m in models]  # teachers only infer, in fp32: BatchNorms folded exactly
    models = [m.to(device) for m in models]
    names = models[0].card.class_names
    for model, spec in zip(models[1:], opts.teacher[1:]):
        if model.card.class_names != names:
            raise NaktError(spec, f"classes {model.card.class_names} differ from {opts.teacher[0]}'s {names}")
    table = _unlabelled(opts.images, opts.cases)
    with outputs.fresh_output(opts.out, outputs.LABEL_SET, opts.overwrite):  # written at the end, in one go
        return _write_label_table(opts, models, table, weights, folded)


def _write_label_table(opts, models: list[NaktModel], table: LabelTable, weights: list[float] | None,
                       folded: list[int]) -> Path:
    names = models[0].card.class_names
    teacher_probs = _teacher_probs(models, table, opts.progress)  # [K, N, C]
    if len(models) > 1:  # fusion rules take [K, C, *spatial]: the images play the role of the spatial axis
        fused = fuse(np.transpose(teacher_probs, (0, 2, 1)), opts.fusion, weights).T
    else:
        fused = teacher_probs[0]
    out = Path(opts.out)
    agree = (teacher_probs.argmax(2) == fused.argmax(1)).mean(0)
    write_class_table(out / LABELS_CSV, table.keys, names, fused)
    labelset.write_manifest(out, {
        "nakt_version": __version__, "task": "classification", "images": str(opts.images), "fusion": opts.fusion,
        "teachers": [{"spec": str(t), "weight": None if weights is None else weights[i],
                      "batchnorm_folded": folded[i]} for i, t in enumerate(opts.teacher)],
        "classes": len(names), "class_names": names, "label_values": list(range(len(names))),
        "teacher_agreement": float(agree.mean()), "cases": len(table.keys)})
    return out


def predict_classification(opts, model: NaktModel, info: dict | None = None) -> Path:
    """``predictions.csv``: one probability column per class and the predicted class (`info` goes into
    ``predictions.json``)."""
    table = _unlabelled(opts.images, opts.cases)
    begin_predictions(opts.out, opts.model, [], opts.overwrite, info)
    probs = table_probs(model, table, opts.progress)
    names = model.card.class_names
    decided = [names[i] for i in probs.argmax(1)]
    write_class_table(Path(opts.out) / "predictions.csv", table.keys, names, probs, {"prediction": decided})
    end_predictions(opts.out, opts.model, [], info)
    return Path(opts.out)


def evaluate_classification(opts, model: NaktModel) -> dict:
    """AUC, accuracy, F1, balanced accuracy, ECE (and quadratic kappa for graded tasks) -> summary.json."""
    table = read_labels(opts.images, opts.labels, opts.cases, opts.label_column)
    if table.class_names != model.card.class_names:
        raise NaktError(opts.labels or opts.images, f"classes {table.class_names} differ from the model's "
                        f"{model.card.class_names}")
    probs = table_probs(model, table, opts.progress, (opts.attack, opts.eps, opts.steps) if opts.attack else None)
    labels = table.targets.argmax(1) if table.kind == "probs" else table.targets.astype(int)
    graded = opts.graded or model.card.head == "ordinal"
    scores = classification_scores(probs, labels, graded=graded)
    per_case = [{"case": k, "label": labels[i].tolist(), "probs": probs[i].round(5).tolist()}
                for i, k in enumerate(table.keys)]
    return write_summary(opts.out, {"task": "classification", **scores, "class_names": table.class_names,
                                    "attack": opts.attack, "eps": opts.eps if opts.attack else None,
                                    "model": opts.model, "per_case": per_case})
