"""Losses on probability targets, so hard masks (one-hot) and teachers' soft labels share one path."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SoftDiceCELoss"]


class SoftDiceCELoss(nn.Module):
    """Dice + cross-entropy for logits ``[B, C, *spatial]`` and probability targets ``[B, C, *spatial]``.

    MONAI 1.6's ``DiceCELoss`` has no soft-label Dice, so this composes ``DiceLoss(soft_label=True)`` with
    cross-entropy on probability targets. On one-hot targets it equals ``DiceCELoss(softmax=True)``.

    >>> loss = SoftDiceCELoss()
    >>> t = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])[None]  # [B=1, C=2, 1, 2]
    >>> bool(loss(10 * (2 * t - 1), t) < loss(-10 * (2 * t - 1), t))
    True
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(softmax=True, soft_label=True)
        self.dice_masked = DiceLoss(softmax=False, soft_label=True)  # takes masked probabilities
        self.ce = nn.CrossEntropyLoss()
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` ``[B, 1, *spatial]`` (optional, in [0, 1]) weighs each pixel's share of both terms: 0 leaves
        it out (e.g. pixels on which the teachers disagree), fractions count it partly."""
        logits = logits.float()
        if mask is None:
            return self.dice_weight * self.dice(logits, target) + self.ce_weight * self.ce(logits, target)
        probs = torch.softmax(logits, dim=1) * mask
        dice = self.dice_masked(probs, target * mask)
        ce = -(target * torch.log_softmax(logits, dim=1)).sum(1, keepdim=True)
        ce = (ce * mask).sum() / mask.sum().clamp_min(1)
        return self.dice_weight * dice + self.ce_weight * ce
