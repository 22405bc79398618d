"""Losses on probability targets, so hard masks (one-hot) and teachers' soft labels share one path; the marginal
form for partially annotated masks (Shi et al. 2021, "Marginal loss and exclusion loss for partially supervised
multi-organ segmentation")."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SoftDiceCELoss"]


class SoftDiceCELoss(nn.Module):
    """Dice + cross-entropy for logits ``[B, C, *spatial]`` and probability targets ``[B, C, *spatial]``.

    MONAI 1.6's ``DiceCELoss`` has no soft-label Dice, so this composes ``DiceLoss(soft_label=True)`` with
    cross-entropy on probability targets. On one-hot targets it equals ``DiceCELoss(softmax=True)``.
    `batch_dice` computes each class's Dice over the whole batch (nnU-Net's batch Dice, MONAI's ``batch=True``)
    instead of per sample: per sample, a class absent from a sample's target costs almost 1 unless the network
    gives it ~0 probability everywhere there, which teaches it not to predict small or rare classes at all.

    >>> loss = SoftDiceCELoss()
    >>> t = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])[None]  # [B=1, C=2, 1, 2]
    >>> bool(loss(10 * (2 * t - 1), t) < loss(-10 * (2 * t - 1), t))
    True
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, batch_dice: bool = False):
        super().__init__()
        from monai.losses import DiceLoss

        self.batch_dice = batch_dice
        self.dice = DiceLoss(softmax=True, soft_label=True, batch=batch_dice)
        self.dice_masked = DiceLoss(softmax=False, soft_label=True, batch=batch_dice)  # takes masked probabilities
        # [B, C, 1...], or [C, 1...] with batch_dice
        self.dice_per_class = DiceLoss(softmax=False, soft_label=True, reduction="none", batch=batch_dice)
        self.ce = nn.CrossEntropyLoss()
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                known: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` ``[B, 1, *spatial]`` (optional, in [0, 1]) weighs each pixel's share of both terms: 0 leaves
        it out (e.g. pixels on which the teachers disagree), fractions count it partly. `known` ``[B, C]``
        (bool, optional) says which classes each sample's target annotates: the marginal loss (`marginal`)."""
        logits = logits.float()
        if known is not None and not bool(known.all()):
            return self.marginal(logits, target, known, mask)
        if mask is None:
            return self.dice_weight * self.dice(logits, target) + self.ce_weight * self.ce(logits, target)
        probs = torch.softmax(logits, dim=1) * mask
        dice = self.dice_masked(probs, target * mask)
        ce = -(target * torch.log_softmax(logits, dim=1)).sum(1, keepdim=True)
        ce = (ce * mask).sum() / mask.sum().clamp_min(1)
        return self.dice_weight * dice + self.ce_weight * ce

    def marginal(self, logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss against a partially annotated target: where a sample's mask leaves class c unannotated
        (``known[b, c]`` False), its pixels of c were stored as background, so the network's probabilities of
        the unannotated classes are merged into background (summed) before the loss, on the target likewise;
        predicting an unannotated class there costs nothing, and Dice is averaged over the annotated classes
        only. Background (class 0) is always annotated. With every class known this equals `forward`.

        logits ``[B, C, *spatial]``, target ``[B, C, *spatial]`` probabilities, known ``[B, C]`` bool,
        mask ``[B, 1, *spatial]`` or None.
        """
        known = known.bool().clone()
        known[:, 0] = True
        shape = (*known.shape, *([1] * (logits.dim() - 2)))
        unknown = ~known.view(shape)
        merged_into_bg = unknown.clone()
        merged_into_bg[:, 0] = True
        log_probs = torch.log_softmax(logits, dim=1)
        log_bg = torch.logsumexp(log_probs.masked_fill(~merged_into_bg, float("-inf")), dim=1, keepdim=True)
        log_probs = torch.cat([log_bg, log_probs[:, 1:]], dim=1).masked_fill(unknown, float("-inf"))
        bg_target = (target * merged_into_bg).sum(1, keepdim=True)
        target = torch.cat([bg_target, target[:, 1:]], dim=1).masked_fill(unknown, 0.0)
        weight = torch.ones_like(bg_target) if mask is None else mask
        ce = -torch.where(target > 0, target * log_probs, torch.zeros_like(target)).sum(1, keepdim=True)
        ce = (ce * weight).sum() / weight.sum().clamp_min(1e-6 if mask is None else 1)
        per_class = self.dice_per_class(log_probs.exp() * weight, target * weight)
        if self.batch_dice:  # unannotated classes hold 0 on both sides: the batch sums are over the annotating samples
            dice = per_class.flatten(1).mean(1)[known.any(0)].mean()
        else:
            dice = (per_class.flatten(2).mean(2) * known).sum() / known.sum()  # per_class [B, C]
        return self.dice_weight * dice + self.ce_weight * ce
