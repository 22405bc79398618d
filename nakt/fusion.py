"""Multi-teacher fusion. Every rule maps teacher probabilities ``[K, C, *spatial]`` (and optional teacher
weights ``[K]``) to fused probabilities ``[C, *spatial]`` that sum to 1 over C. Rules live in `FUSIONS`.
"""

from __future__ import annotations

import numpy as np

from nakt.errors import NaktError, look_up_option

__all__ = [
    "FUSIONS",
    "default_fusion",
    "fuse",
    "fuse_confidence",
    "fuse_mean",
    "fuse_partial",
    "fuse_staple",
    "fuse_staple_weighted",
    "fuse_trimmed_vote",
    "fuse_vote",
    "fuse_weighted",
    "agreement_map",
    "hard_labels",
    "outlier_teacher",
    "pairwise_dice",
    "sharpen",
    "staple_estimates",
    "staple_weights",
    "teacher_agreement",
    "trimmed_vote",
]


def hard_labels(probs: np.ndarray, axis: int = 0) -> np.ndarray:
    """The class of highest probability along `axis`: ``[C, *spatial]`` -> ``[*spatial]`` (``axis=0``), ``[K, C,
    *spatial]`` -> ``[K, *spatial]`` (``axis=1``). Exactly ``probs.argmax(axis)`` (the first maximum wins, and a
    NaN), as uint8 up to 256 classes.

    numpy's argmax along a leading axis strides across the class planes; for two classes one comparison of the
    two planes gives the same answer ([3, 2, 512, 512] along axis 1: 12 ms -> 0.16 ms, measured here).

    >>> hard_labels(np.array([[0.2, 0.5, 0.7], [0.8, 0.5, 0.3]])).tolist()
    [1, 0, 0]
    """
    c = probs.shape[axis]
    if c == 2:
        first, second = np.moveaxis(probs, axis, 0)
        wins = second > first
        nan = np.isnan(second)
        if nan.any():  # argmax takes the first NaN
            wins |= nan & ~np.isnan(first)
        return wins.view(np.uint8)
    hard = probs.argmax(axis)
    return hard.astype(np.uint8) if c <= 256 else hard


def _weights(weights, k: int) -> np.ndarray:
    w = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (k,) or (w < 0).any() or w.sum() <= 0:
        raise NaktError(None, f"need {k} non-negative teacher weights with a positive sum, got {weights}")
    return w / w.sum()


def fuse_mean(probs: np.ndarray, weights=None) -> np.ndarray:
    """Plain mean over teachers (weights ignored).

    >>> fuse_mean(np.array([[[1.0], [0.0]], [[0.0], [1.0]]]))[:, 0].tolist()
    [0.5, 0.5]
    """
    return probs.mean(axis=0)


def fuse_weighted(probs: np.ndarray, weights=None) -> np.ndarray:
    """Mean weighted by teacher quality (e.g. validation Dice); equal weights when none are given."""
    w = _weights(weights, probs.shape[0])
    return np.tensordot(w, probs, axes=1).astype(probs.dtype)


def fuse_vote(probs: np.ndarray, weights=None) -> np.ndarray:
    """Majority vote of the teachers' hard labels, as one-hot ``[C, *spatial]``.

    Each teacher votes for its argmax class (with `weights`, a weighted vote). Ties: among the tied classes,
    the one with the highest mean teacher probability wins (and, should that tie too, the lowest class index),
    so a tie never yields an extra "undecided" label as SimpleITK's LabelVoting does.
    """
    k, c = probs.shape[:2]
    w = _weights(weights, k)
    hard = hard_labels(probs, 1)  # [K, *spatial]
    votes = np.stack([(w[:, None] * (hard == j).reshape(k, -1)).sum(0) for j in range(c)]).reshape(
        (c,) + probs.shape[2:])
    tied = np.isclose(votes, votes.max(axis=0, keepdims=True))
    score = np.where(tied, probs.mean(axis=0), -np.inf)
    winner = hard_labels(score, 0)
    # one-hot by comparison rather than gathering rows of an identity matrix (8x faster), laid out [*spatial, C]
    # as that gather was, so the stored .npy files keep their bytes (a one-row image's is Fortran-ordered)
    return np.moveaxis((winner[..., None] == np.arange(c)).astype(probs.dtype), -1, 0)


def _staple_binary(masks: np.ndarray) -> tuple[np.ndarray, list[float], list[float]]:
    """SimpleITK STAPLE on K binary masks ``[K, *spatial]`` -> foreground probability, sensitivities,
    specificities."""
    import SimpleITK as sitk

    if masks.any(axis=tuple(range(1, masks.ndim))).sum() == 0:  # nobody sees foreground: nothing to estimate
        return np.zeros(masks.shape[1:]), [1.0] * len(masks), [1.0] * len(masks)
    if masks.all():
        return np.ones(masks.shape[1:]), [1.0] * len(masks), [1.0] * len(masks)
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1.0)
    f.SetMaximumIterations(200)  # SimpleITK's default is unbounded; near-empty classes can converge very slowly
    out = f.Execute([sitk.GetImageFromArray(m.astype(np.uint8)) for m in masks])
    p = np.nan_to_num(sitk.GetArrayFromImage(out).astype(np.float64), nan=0.0)
    return np.clip(p, 0, 1), list(f.GetSensitivity()), list(f.GetSpecificity())


def staple_estimates(probs: np.ndarray) -> tuple[np.ndarray, dict]:
    """STAPLE over the teachers' hard labels, one foreground class against the rest at a time.

    Returns fused probabilities ``[C, *spatial]`` and ``{"sensitivity": [K], "specificity": [K]}`` (means over
    foreground classes): label-free estimates of each teacher's quality.

    Kept over SimpleITK's MultiLabelSTAPLE: on brats6's multi-class truth with simulated teachers it gave labels
    0.031 Dice closer to the truth (benchmarks/staple_comparison.py), and soft probabilities and per-teacher
    sensitivity and specificity, which MultiLabelSTAPLE (hard labels, confusion matrices) does not.
    """
    k, c = probs.shape[:2]
    hard = hard_labels(probs, 1)
    fg, sens, spec = [], [], []
    for j in range(1, c):
        p, se, sp = _staple_binary(hard == j)
        fg.append(p)
        sens.append(se)
        spec.append(sp)
    fg = np.stack(fg)
    if c == 2:
        fused = np.concatenate([1 - fg, fg])
    else:
        # Background takes what no foreground class claims; then renormalise (one-vs-rest estimates overlap).
        fused = np.concatenate([np.clip(1 - fg.sum(0, keepdims=True), 0, 1), fg])
        total = fused.sum(0, keepdims=True)
        fused = np.where(total > 0, fused / np.maximum(total, 1e-8), probs.mean(0))
    quality = {"sensitivity": np.mean(sens, axis=0).tolist(), "specificity": np.mean(spec, axis=0).tolist()}
    return fused.astype(probs.dtype), quality


def fuse_staple(probs: np.ndarray, weights=None) -> np.ndarray:
    """STAPLE (Warfield et al. 2004, via SimpleITK) on the teachers' hard labels; weights ignored, since
    STAPLE estimates each teacher's reliability itself."""
    return staple_estimates(probs)[0]


def fuse_staple_weighted(probs: np.ndarray, weights=None) -> np.ndarray:
    """Mean of the teachers' probabilities weighted by STAPLE's label-free estimate of each one's quality on
    this case, Youden's index ``sensitivity + specificity - 1`` (clipped at 0.01, so that no teacher is
    silenced entirely); given `weights` multiply it. Soft, unlike STAPLE's own fused estimate."""
    prior = np.ones(len(probs)) if weights is None else _weights(weights, len(probs))
    return fuse_weighted(probs, staple_weights(staple_estimates(probs)[1]) * prior)


def staple_weights(quality: dict) -> np.ndarray:
    """Teacher weights ``[K]`` from `staple_estimates`' quality: Youden's index, clipped at 0.01."""
    return np.clip(np.add(quality["sensitivity"], quality["specificity"]) - 1, 0.01, None)


def fuse_confidence(probs: np.ndarray, weights=None) -> np.ndarray:
    """Per-pixel weighted mean: each teacher counts by its confidence there, ``1 - H(p) / log C`` (its
    normalised entropy), so a teacher unsure of a pixel yields to one that is sure; given `weights` multiply it.

    >>> sure, unsure = [[0.99], [0.01]], [[0.4], [0.6]]
    >>> bool(fuse_confidence(np.array([sure, unsure]))[0, 0] > 0.95)  # the plain mean is 0.695
    True
    """
    k, c = probs.shape[:2]
    p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(axis=1) / np.log(c)  # [K, *spatial] in [0, 1]
    confidence = np.clip(1.0 - entropy, 1e-3, None)
    if weights is not None:
        confidence = confidence * _weights(weights, k).reshape((k,) + (1,) * (probs.ndim - 2))
    fused = (confidence[:, None] * probs).sum(axis=0) / confidence.sum(axis=0)[None]
    return fused.astype(probs.dtype)


def outlier_teacher(probs: np.ndarray) -> int | None:
    """The teacher that agrees least with the others on this case, or None when none stands out (fewer than
    three teachers, or a tie for least agreement).

    Agreement: a teacher's mean hard-label Dice with each other teacher, averaged over the foreground classes
    (1.0 where both see none of a class). With three or more teachers the odd one out is the one the others
    contradict, a label-free guess at the weakest teacher on this case.
    """
    k, c = probs.shape[:2]
    if k < 3:
        return None
    agreement = (pairwise_dice(hard_labels(probs, 1), c).sum(axis=1) - 1) / (k - 1)
    lowest = np.flatnonzero(np.isclose(agreement, agreement.min()))
    return int(lowest[0]) if len(lowest) == 1 else None


def fuse_trimmed_vote(probs: np.ndarray, weights=None) -> np.ndarray:
    """Majority vote (`fuse_vote`, its tie rule included) of the teachers left after dropping the one that agrees
    least with the others on this case (`outlier_teacher`); with fewer than three teachers, or no clear outlier,
    the vote of all. With three teachers the two kept ones tie wherever they differ, so the label there is the
    argmax of their mean probability.

    >>> blank, lesion = [[1.0, 1.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]  # C=2, 2 pixels
    >>> fuse_trimmed_vote(np.array([lesion, lesion, blank]))[1].tolist()  # the blank teacher is the odd one out
    [1.0, 0.0]
    """
    return trimmed_vote(probs, weights)[0]


def trimmed_vote(probs: np.ndarray, weights=None) -> tuple[np.ndarray, int | None]:
    """`fuse_trimmed_vote` and the index of the teacher it dropped (None: it kept them all)."""
    dropped = outlier_teacher(probs)
    if dropped is None:
        return fuse_vote(probs, weights), None
    kept = [i for i in range(len(probs)) if i != dropped]
    return fuse_vote(probs[kept], None if weights is None else np.asarray(weights, dtype=np.float64)[kept]), dropped


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature sharpening of fused soft labels ``[C, *spatial]``: ``p ** (1 / T)`` renormalised (T < 1
    sharpens, T = 1 leaves them, T > 1 softens); the argmax never changes.

    >>> sharpen(np.array([[0.75], [0.25]]), 0.5)[:, 0].round(2).tolist()
    [0.9, 0.1]
    """
    if temperature == 1:
        return probs
    powered = np.power(np.clip(probs.astype(np.float64), 0, 1), 1.0 / temperature)
    return (powered / np.maximum(powered.sum(axis=0, keepdims=True), 1e-12)).astype(probs.dtype)


FUSIONS = {"mean": fuse_mean, "weighted": fuse_weighted, "vote": fuse_vote, "staple": fuse_staple,
           "staple-weighted": fuse_staple_weighted, "confidence": fuse_confidence, "trimmed-vote": fuse_trimmed_vote}


def default_fusion(task: str, teachers: int) -> str:
    """`nakt label`'s rule when none is given. Two or more segmentation teachers: the majority vote, the best or
    second-best student on all four segmentation benchmarks (benchmarks/README.md), where the mean was the worst or
    second worst. One teacher: the mean, which keeps its own soft probabilities; classification: the mean, since a
    classifier learns from the teachers' soft class probabilities (Hinton KD), which a vote would discard."""
    return "vote" if task == "segmentation" and teachers > 1 else "mean"


def fuse(probs: np.ndarray, method: str = "mean", weights=None) -> np.ndarray:
    """Fuse ``[K, C, *spatial]`` teacher probabilities with the named rule -> ``[C, *spatial]``."""
    return FUSIONS[look_up_option(method, FUSIONS, "fusion")](probs, weights)


def fuse_partial(probs: np.ndarray, known: np.ndarray, method: str = "mean",
                 weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Fuse teachers that know only some of the C classes: ``probs [K, C, *spatial]`` (zeros where a teacher
    does not know a class), ``known [K, C]`` bool. Each foreground class c is fused one against the rest with
    `method` over the teachers that know it alone (a teacher that does not know c says nothing about it,
    neither "present" nor "background"). A teacher's evidence for c is its probability of c for the soft rules
    and, for the rules on hard labels (vote, trimmed vote, STAPLE), whether c is its argmax: the class it would
    itself predict, even at a probability under 0.5 where its classes share a pixel.

    Background takes what the fused foreground classes leave, ``max(0, 1 - sum_c per_class[c])``, and the result
    is normalised; a pixel's label is its argmax (ties: background first, then the lower class value). So one
    teacher that knows every class keeps its own labels under every rule (its probabilities under mean), and
    teachers that all know every class fuse as `fuse` does under mean and weighted.

    Returns ``(fused [C, *spatial], per_class [C, *spatial])``: `per_class[c]` is class c's fused probability
    (row 0 unused).

    >>> probs = np.array([[[0.3], [0.45], [0.25], [0.0]], [[0.7], [0.0], [0.2], [0.1]]])  # A: 1, 2; B: 2, 3
    >>> known = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], bool)
    >>> [int(fuse_partial(probs, known, m)[0].argmax()) for m in ("mean", "vote")]  # A's argmax, under 0.5
    [1, 1]
    """
    hard = method in ("vote", "trimmed-vote", "staple")
    choice = hard_labels(probs, 1) if hard else None  # [K, *spatial]: each teacher's own prediction
    per_class = np.zeros(probs.shape[1:], dtype=np.float32)
    for c in range(1, probs.shape[1]):
        knowing = np.flatnonzero(known[:, c])
        if not len(knowing):
            continue
        evidence = (choice[knowing] == c).astype(probs.dtype) if hard else probs[knowing, c]
        binary = np.stack([1 - evidence, evidence], axis=1)
        rule = method if len(knowing) > 1 else ("vote" if hard else "mean")  # what K rules do with one
        per_class[c] = fuse(binary, rule, None if weights is None else [weights[k] for k in knowing])[1]
    fused = per_class.copy()
    fused[0] = np.maximum(1 - per_class[1:].sum(axis=0), 0)
    return fused / np.maximum(fused.sum(axis=0, keepdims=True), 1e-12), per_class


def teacher_agreement(probs: np.ndarray) -> dict:
    """How much K teachers agree on one case: the fraction of pixels where all hard labels match, and the mean
    pairwise foreground Dice (1.0 when both teachers see no foreground)."""
    hard = hard_labels(probs, 1)
    k = hard.shape[0]
    all_agree = float((hard == hard[0]).all(axis=0).mean())
    pairs = pairwise_dice((hard > 0).view(np.uint8), 2)[np.triu_indices(k, 1)]  # foreground against background
    return {"pixel_agreement": all_agree, "pairwise_dice": float(pairs.mean()) if k > 1 else 1.0}


def pairwise_dice(hard: np.ndarray, classes: int, chunk: int = 1 << 22) -> np.ndarray:
    """``[K, K]`` Dice between K hard label maps ``[K, *spatial]``, the mean over foreground classes
    ``1 .. classes - 1`` (1.0 for a class neither map has); 1.0 on the diagonal.

    All pairs at once: per class, the overlaps are one matrix product of the K membership masks, taken over
    `chunk` pixels at a time (float32 counts stay exact below 2**24 per chunk; summed in float64).

    >>> pairwise_dice(np.array([[0, 1, 1, 0], [0, 1, 0, 0], [2, 2, 2, 2]]), 2).round(3).tolist()
    [[1.0, 0.667, 0.0], [0.667, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    k = hard.shape[0]
    flat = hard.reshape(k, -1)
    dice = np.zeros((k, k))
    for j in range(1, classes):
        overlap = np.zeros((k, k))
        for start in range(0, flat.shape[1], chunk):
            member = (flat[:, start:start + chunk] == j).astype(np.float32)
            overlap += member @ member.T
        size = np.diag(overlap)
        denominator = size[:, None] + size[None, :]
        dice += np.where(denominator > 0, 2 * overlap / np.maximum(denominator, 1), 1.0)
    dice = dice / max(classes - 1, 1) if classes > 1 else np.ones((k, k))
    np.fill_diagonal(dice, 1.0)
    return dice


def agreement_map(teacher_probs: np.ndarray, fused: np.ndarray) -> np.ndarray:
    """Per pixel, the fraction of the K teachers whose hard label is the fused one: ``[*spatial]`` in [0, 1].

    >>> teachers = np.array([[[0.1, 0.9], [0.9, 0.1]], [[0.2, 0.3], [0.8, 0.7]]])  # K=2, C=2, 2 pixels
    >>> agreement_map(teachers, fused=np.array([[0.1, 0.6], [0.9, 0.4]])).tolist()
    [1.0, 0.5]
    """
    return (hard_labels(teacher_probs, 1) == hard_labels(fused, 0)[None]).mean(axis=0)
