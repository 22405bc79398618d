"""Adversarial attacks for robustness checks (FGSM, Goodfellow et al. 2015; PGD, Madry et al. 2018).

Perturbations live in the network's input space (after per-image normalisation), so `eps` is in units of
the normalised intensity (about one standard deviation of the image for ``zscore``).
"""

from __future__ import annotations

import torch

from nakt.classify.data import LabelTable
from nakt.classify.losses import kd_loss
from nakt.classify.prepared import target_probs
from nakt.errors import look_up_option
from nakt.models import NaktModel

__all__ = ["ATTACKS", "attack_images"]

ATTACKS = ("fgsm", "pgd")


def _gradient_sign(model: NaktModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    loss = kd_loss(model(x), y, model.card.head)
    (grad,) = torch.autograd.grad(loss, x)
    return grad.sign()


def attack_images(model: NaktModel, images: torch.Tensor, table: LabelTable, method: str, eps: float,
                  steps: int = 10, batch_size: int = 32) -> torch.Tensor:
    """Adversarial versions ``[N, C_in, H, W]`` of prepared `images` that raise the loss on the true labels.

    ``fgsm``: one step of size `eps`; ``pgd``: `steps` steps of ``2.5 * eps / steps`` projected onto the
    L-infinity ball of radius `eps`, from a random start.
    """
    look_up_option(method, ATTACKS, "attack")
    model.eval()
    device = next(model.parameters()).device
    targets = target_probs(table)
    generator = torch.Generator().manual_seed(0)
    out = []
    for start in range(0, len(images), batch_size):
        x0 = images[start:start + batch_size].float().to(device)
        y = targets[start:start + batch_size].to(device)
        if method == "fgsm":
            x = x0 + eps * _gradient_sign(model, x0, y)
        else:
            noise = (torch.rand(x0.shape, generator=generator) * 2 - 1).to(device) * eps
            x = x0 + noise
            for _ in range(steps):
                x = x + 2.5 * eps / steps * _gradient_sign(model, x, y)
                x = x0 + (x - x0).clamp(-eps, eps)
        out.append(x.detach().cpu())
    return torch.cat(out)
