"""RoS-KD (Jaiswal et al. 2022): K teachers trained on overlapping random subsets of the labelled data; during
distillation one teacher is drawn at random for each step, and the student is smoothed by an exponential
moving average of its weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["overlapping_subsets", "TeacherSampler", "ema_model", "flip_labels"]


def overlapping_subsets(n: int, k: int, fraction: float, seed: int = 0) -> list[np.ndarray]:
    """K sorted random subsets of ``range(n)``, each of ``round(fraction * n)`` items (they overlap when
    ``k * fraction > 1``)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"subset fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    size = max(1, round(fraction * n))
    return [np.sort(rng.choice(n, size, replace=False)) for _ in range(k)]


class TeacherSampler:
    """Draws which teacher supervises each step: uniformly at random (``random``, RoS-KD) or all (``mean``)."""

    def __init__(self, k: int, mode: str = "random", seed: int = 0):
        self.k, self.mode = k, mode
        self.rng = np.random.default_rng(seed)

    def draw(self) -> list[int]:
        return [int(self.rng.integers(self.k))] if self.mode == "random" else list(range(self.k))


def ema_model(model: nn.Module, decay: float = 0.999, warmup: bool = True) -> torch.optim.swa_utils.AveragedModel:
    """A copy of `model` whose weights (and BatchNorm statistics) follow ``d * ema + (1 - d) * model`` after each
    `update_parameters`.

    With `warmup` (as timm's ModelEmaV3 and TensorFlow's ``num_updates``), ``d = min(decay, (1 + n) / (10 + n))``
    after n updates: a short run (a few hundred steps at decay 0.99) would otherwise keep a large share of its
    first, barely trained weights (0.99 ** 100 = 0.37).
    """
    from torch.optim.swa_utils import AveragedModel

    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], model_params: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        d = min(decay, (1 + int(n_averaged)) / (10 + int(n_averaged))) if warmup else decay
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, model_params, 1 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked) follow the model
            for ema_param, model_param in zip(ema_params, model_params):
                ema_param.copy_(model_param)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def flip_labels(labels: np.ndarray, classes: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Label-noise experiments: a copy of `labels` ``[N]`` with `fraction` of them changed to another class."""
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    chosen = rng.choice(len(labels), round(fraction * len(labels)), replace=False)
    noisy[chosen] = (labels[chosen] + rng.integers(1, classes, len(chosen))) % classes
    return noisy
