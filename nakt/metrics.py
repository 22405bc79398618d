"""Segmentation metrics (MONAI underneath), called as ``(pred, target)`` on label maps or one-hot tensors.

`case_scores` is the per-case function used by `evaluate` and by validation during training.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from nakt.preprocess import one_hot

__all__ = ["case_scores", "dice_per_class", "hd95_per_class"]


def dice_per_class(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice ``[B, C-1]`` of foreground classes for one-hot ``[B, C, *spatial]`` inputs; NaN where a class is
    absent from both prediction and target.

    >>> p = torch.tensor([[[1, 1, 0, 0]]]); t = torch.tensor([[[1, 0, 0, 0]]])
    >>> round(float(dice_per_class(one_hot(p, 2), one_hot(t, 2))[0, 0]), 3)
    0.667
    """
    from monai.metrics import compute_dice

    dice = compute_dice(pred, target, include_background=False, ignore_empty=False)
    absent = (pred[:, 1:].flatten(2).sum(-1) == 0) & (target[:, 1:].flatten(2).sum(-1) == 0)
    return torch.where(absent, torch.full_like(dice, float("nan")), dice)


def hd95_per_class(pred: torch.Tensor, target: torch.Tensor, spacing=None) -> torch.Tensor:
    """95th-percentile Hausdorff distance ``[B, C-1]`` (in spacing units); NaN where either side is empty."""
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():  # MONAI warns for every empty class; we report those as NaN
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(pred, target, include_background=False, percentile=95, spacing=spacing)
    return torch.where(torch.isfinite(hd), hd, torch.full_like(hd, float("nan")))


def case_scores(pred: np.ndarray, target: np.ndarray, classes: int, spacing=None, hd95: bool = True) -> dict:
    """Scores of one case from class-index maps ``[*spatial]``: foreground Dice averaged over the classes
    present in prediction or target (1.0 when neither has foreground), HD95 likewise (None when undefined),
    and per-class Dice."""
    p = one_hot(torch.as_tensor(pred)[None], classes)
    t = one_hot(torch.as_tensor(target)[None], classes)
    dice = dice_per_class(p, t)[0].numpy()
    scores = {"dice": float(np.nanmean(dice)) if np.isfinite(dice).any() else 1.0,
              "dice_per_class": [None if np.isnan(d) else float(d) for d in dice]}
    if hd95:
        hd = hd95_per_class(p, t, spacing)[0].numpy()
        scores["hd95"] = float(np.nanmean(hd)) if np.isfinite(hd).any() else None
    return scores
