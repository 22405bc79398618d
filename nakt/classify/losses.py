"""Distillation losses for classifiers, called as ``(student_logits, target_probs)``.

Hard labels are one-hot probabilities, so plain training and distillation share one loss: with ``T = 1`` and a
one-hot target, the KL divergence equals the cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soften", "kd_loss", "cumulative_targets"]


def soften(probs: torch.Tensor, temperature: float, head: str = "softmax") -> torch.Tensor:
    """Raise a teacher's probabilities to temperature T, as if its logits were divided by T.

    Softmax: ``p^(1/T)`` renormalised; sigmoid heads: ``sigmoid(logit(p) / T)`` per label.
    """
    eps = 1e-6
    if head == "softmax":
        return torch.softmax(torch.log(probs.clamp_min(eps)) / temperature, dim=1)
    p = probs.clamp(eps, 1 - eps)
    return torch.sigmoid(torch.log(p / (1 - p)) / temperature)


def cumulative_targets(probs: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``[B, C]`` -> ordinal targets ``P(y > k)`` ``[B, C-1]``."""
    return (1 - probs.cumsum(dim=1))[:, :-1].clamp(0, 1)


def _binary_kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(target) || Bernoulli(sigmoid(logits))), averaged over labels and samples."""
    entropy = -(target * torch.log(target.clamp_min(1e-8)) + (1 - target) * torch.log((1 - target).clamp_min(1e-8)))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce - entropy).mean(dim=1).mean()


def kd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, head: str = "softmax",
            temperature: float = 1.0, alpha: float = 1.0, hard_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton et al. (2015) knowledge distillation.

    ``alpha * T^2 * KL(soften(target, T) || student(T)) + (1 - alpha) * KL(hard || student(1))``, where the
    T^2 factor keeps gradient sizes comparable across temperatures. `student_logits` ``[B, K]``; `target_probs`
    and `hard_probs` ``[B, C]`` class probabilities (``K = C`` except ordinal heads, where ``K = C - 1``).
    Sigmoid (multi-label) and ordinal heads use a binary KL per label / per threshold.

    >>> s = torch.tensor([[2.0, 0.0]]); t = torch.tensor([[0.5, 0.5]])
    >>> round(float(kd_loss(s, t, temperature=2.0)), 4)  # 4 * KL([.5,.5] || softmax([1, 0]))
    0.4805
    """

    def term(probs: torch.Tensor, t: float) -> torch.Tensor:
        if head == "softmax":
            target = soften(probs, t)
            return F.kl_div(torch.log_softmax(student_logits / t, dim=1), target, reduction="batchmean")
        if head == "ordinal":
            probs = cumulative_targets(probs)
        return _binary_kl(soften(probs, t, "sigmoid"), student_logits / t)

    loss = alpha * temperature**2 * term(target_probs, temperature)
    if hard_probs is not None and alpha < 1:
        loss = loss + (1 - alpha) * term(hard_probs, 1.0)
    return loss
