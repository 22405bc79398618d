"""Targeted transfer learning (Romero et al. 2020; Howard & Ruder 2018): layer groups ordered from input to head,
discriminative learning rates over them, and gradual unfreezing from the head down."""

from __future__ import annotations

import torch
from torch import nn

from nakt.errors import look_up_option

__all__ = ["layer_groups", "discriminative_param_groups", "trainable_groups", "apply_unfreezing", "make_optimizer"]

RECIPES = ("targeted",)


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names in groups from input (stem) to output (head).

    timm models describe their own groups (`group_matcher`); encoder-decoder nets (smp) give one group per
    encoder stage, then the decoder, then the head; anything else is split by top-level children.
    """
    net = getattr(model, "net", model)
    prefix = "net." if net is not model else ""
    if hasattr(net, "group_matcher"):
        from timm.models import group_modules

        groups = group_modules(net, net.group_matcher(coarse=True))
        ordered = [groups[k] for k in sorted(groups)]
        names = {n for n, _ in net.named_parameters()}
        result = [[prefix + n for n in sorted({p for m in g for p in names if p == m or p.startswith(m + ".")})]
                  for g in ordered]
        return [g for g in result if g]
    if hasattr(net, "encoder") and hasattr(net, "decoder"):
        stages = [name for name, _ in net.encoder.named_children()]
        groups = [[f"{prefix}encoder.{s}.{n}" for n, _ in getattr(net.encoder, s).named_parameters()] for s in stages]
        groups.append([f"{prefix}decoder.{n}" for n, _ in net.decoder.named_parameters()])
        head = [f"{prefix}{n}" for n, _ in net.named_parameters() if not n.startswith(("encoder.", "decoder."))]
        return [g for g in [*groups, head] if g]
    return [[f"{prefix}{c}.{n}" for n, _ in child.named_parameters()] for c, child in net.named_children()
            if any(True for _ in child.parameters())]


def discriminative_param_groups(model: nn.Module, lr: float, decay: float = 2.6) -> list[dict]:
    """Optimizer parameter groups: the head at `lr`, each group closer to the input `decay` times lower."""
    params = dict(model.named_parameters())
    groups = layer_groups(model)
    return [{"params": [params[n] for n in names], "lr": lr / decay ** (len(groups) - 1 - i), "group": i}
            for i, names in enumerate(groups)]


def trainable_groups(epoch: int, n_groups: int, every: int = 1) -> int:
    """How many groups (counted from the head) train in `epoch` (1-based): the head alone first, then one more
    group every `every` epochs.

    >>> [trainable_groups(e, 4) for e in range(1, 6)]
    [1, 2, 3, 4, 4]
    """
    return min(n_groups, 1 + (epoch - 1) // max(every, 1))


def apply_unfreezing(model: nn.Module, epoch: int, every: int = 1) -> list[bool]:
    """Freeze all groups but the last `trainable_groups(epoch)`; returns the trainable flag per group."""
    params = dict(model.named_parameters())
    groups = layer_groups(model)
    k = trainable_groups(epoch, len(groups), every)
    flags = [i >= len(groups) - k for i in range(len(groups))]
    for names, flag in zip(groups, flags):
        for n in names:
            params[n].requires_grad_(flag)
    return flags


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, recipe: str | None = None) -> torch.optim.AdamW:
    """AdamW over all parameters at `lr`, or with ``recipe="targeted"`` over the layer groups at
    discriminative learning rates (pair it with `apply_unfreezing` each epoch)."""
    if recipe is None:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    look_up_option(recipe, RECIPES, "recipe")
    return torch.optim.AdamW(discriminative_param_groups(model, lr), weight_decay=weight_decay)
