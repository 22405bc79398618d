"""Classification metrics from predicted probabilities and targets, as plain functions on NumPy arrays.

`probs` is ``[N, C]``; `labels` is ``[N]`` class indices (multi-class, graded) or ``[N, C]`` 0/1 (multi-label).
AUC comes from MONAI; the rest is short enough to write out (and is tested against scikit-learn).
"""

from __future__ import annotations

import numpy as np

__all__ = ["auc_per_class", "quadratic_kappa", "expected_calibration_error", "classification_scores"]


def auc_per_class(probs: np.ndarray, onehot: np.ndarray) -> list[float | None]:
    """One-vs-rest ROC AUC per class (None where a class has no positive or no negative case)."""
    import torch
    from monai.metrics import compute_roc_auc

    out = []
    for c in range(probs.shape[1]):
        y = onehot[:, c]
        if y.min() == y.max():
            out.append(None)
            continue
        out.append(float(compute_roc_auc(torch.as_tensor(probs[:, c]), torch.as_tensor(y))))
    return out


def quadratic_kappa(pred: np.ndarray, truth: np.ndarray, classes: int) -> float:
    """Cohen's kappa with quadratic weights for graded labels (1 = perfect agreement, 0 = chance)."""
    observed = np.zeros((classes, classes))
    np.add.at(observed, (truth, pred), 1)
    weights = (np.subtract.outer(np.arange(classes), np.arange(classes)) ** 2) / max((classes - 1) ** 2, 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / max(observed.sum(), 1)
    denom = (weights * expected).sum()
    return float(1 - (weights * observed).sum() / denom) if denom > 0 else 0.0


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE: the sample-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def classification_scores(probs: np.ndarray, labels: np.ndarray, graded: bool = False) -> dict:
    """``{"mean": {auc, accuracy, f1, balanced_accuracy, ece[, kappa]}, "per_class": {...}}``.

    Multi-class: argmax decisions, macro averages over classes. Multi-label (`labels` ``[N, C]``): decisions
    at 0.5 per label, averages over labels. `graded` adds quadratic-weighted kappa.
    """
    n, c = probs.shape
    multilabel = labels.ndim == 2
    onehot = labels.astype(int) if multilabel else np.eye(c, dtype=int)[labels]
    decided = (probs >= 0.5).astype(int) if multilabel else np.eye(c, dtype=int)[probs.argmax(1)]
    tp = (decided & onehot).sum(0)
    fp = (decided & (1 - onehot)).sum(0)
    fn = ((1 - decided) & onehot).sum(0)
    tn = ((1 - decided) & (1 - onehot)).sum(0)
    recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), np.nan)
    f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    aucs = auc_per_class(probs, onehot)
    if multilabel:
        specificity = np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), np.nan)
        accuracy = float((decided == onehot).mean())
        balanced = float(np.nanmean((recall + specificity) / 2))
        ece = expected_calibration_error(np.where(decided == 1, probs, 1 - probs).ravel(),
                                         (decided == onehot).ravel())
    else:
        accuracy = float((probs.argmax(1) == labels).mean())
        balanced = float(np.nanmean(recall))
        ece = expected_calibration_error(probs.max(1), probs.argmax(1) == labels)
    mean = {"auc": _mean(aucs), "accuracy": accuracy, "f1": float(np.nanmean(f1)), "balanced_accuracy": balanced,
            "ece": ece}
    if graded and not multilabel:
        mean["kappa"] = quadratic_kappa(probs.argmax(1), labels, c)
    per_class = {"auc": aucs, "f1": [None if np.isnan(v) else float(v) for v in f1],
                 "recall": [None if np.isnan(v) else float(v) for v in recall], "support": onehot.sum(0).tolist()}
    return {"mean": mean, "per_class": per_class}
