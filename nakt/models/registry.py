"""One registry from model specs (``scheme:name``) to builders, and `NaktModel`, the one model contract.

Every builder has the signature ``build(name, *, in_channels, classes, spatial_dims, pretrained=None, **kw)``
and returns ``(module, size_divisor)``; `NaktModel` wraps it so that every model maps ``[B, C_in, *spatial]``
of any size to logits ``[B, C, *spatial]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nakt.errors import NaktError
from nakt.models.card import ModelCard

__all__ = ["BUILDERS", "SCHEME_MODULES", "NaktModel", "build_model", "parse_spec", "register_all", "scheme"]

BUILDERS: dict[str, Callable] = {}

# modules that register schemes when imported (optional dependencies are imported inside their functions)
SCHEME_MODULES = ["nakt.models.classifiers", "nakt.models.monai_nets", "nakt.models.smp_nets",
                  "nakt.models.torchscript", "nakt.models.onnx", "nakt.models.bundle", "nakt.disk_teachers",
                  "nakt.models.nnunet"]


def register_all() -> None:
    """Import every scheme module, so `BUILDERS` and the teacher loaders are complete."""
    import importlib

    for module in SCHEME_MODULES:
        importlib.import_module(module)


def _schemes() -> list[str]:
    from nakt.teachers import LOADERS

    return sorted(set(BUILDERS) | set(LOADERS))


def scheme(name: str) -> Callable:
    """Register a builder for specs ``name:<...>``."""

    def register(fn: Callable) -> Callable:
        BUILDERS[name] = fn
        return fn

    return register


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``"smp:Unet/resnet18"`` into ``("smp", "Unet/resnet18")``; a folder is a run directory."""
    register_all()
    if Path(spec).is_dir():
        return "run", spec
    if ":" not in spec and ("/" in spec or "\\" in spec):
        raise NaktError(spec, "run directory not found")
    if ":" not in spec:
        raise NaktError(None, f"unknown model spec {spec!r}",
                        f"use scheme:name with scheme one of {', '.join(_schemes())}, or a run directory")
    name, rest = spec.split(":", 1)
    if name not in _schemes():
        raise NaktError(None, f"unknown model scheme {name!r} in {spec!r}",
                        f"valid: {', '.join(_schemes())}, or the path of a run directory")
    return name, rest


class NaktModel(nn.Module):
    """A network plus its `ModelCard`. Pads inputs to the network's size divisor and crops the output back.

    ``forward``: ``[B, C_in, *spatial]`` -> logits ``[B, classes, *spatial]``;
    ``predict_proba``: the same, as class probabilities summing to 1 over dim 1.
    """

    def __init__(self, net: nn.Module, card: ModelCard):
        super().__init__()
        self.net, self.card = net, card

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        div = self.card.size_divisor
        spatial = x.shape[2:]
        pad = [(-s) % div for s in spatial]
        if any(pad):
            # F.pad lists the last axis first
            x = F.pad(x, [p for size in reversed(pad) for p in (0, size)], mode="replicate")
        out = self.net(x)
        if isinstance(out, (list, tuple)):  # deep-supervision nets return several heads; the first is full size
            out = out[0]
        if out.ndim == x.ndim:  # dense output: crop the padding away (classifiers return [B, C])
            out = out[(..., *[slice(0, s) for s in spatial])]
        return out

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, classes, ...]``: softmax, per-class sigmoid (multi-label), or the class
        distribution implied by ordinal logits ``P(y > k)``."""
        out = self.forward(x)
        if self.card.output == "probs":
            return out
        return logits_to_probs(out.float(), self.card.head)


def logits_to_probs(logits: torch.Tensor, head: str = "softmax") -> torch.Tensor:
    """``[B, K, ...]`` logits -> probabilities. ``ordinal``: K = C-1 cumulative logits -> ``[B, C, ...]``.

    >>> logits_to_probs(torch.tensor([[0.0, -100.0]]), "ordinal").round(decimals=3).tolist()
    [[0.5, 0.5, 0.0]]
    """
    if head == "sigmoid":
        return torch.sigmoid(logits)
    if head == "ordinal":
        above = torch.sigmoid(logits).cummin(dim=1).values  # P(y > k) must not increase with k
        ones = torch.ones_like(above[:, :1])
        zeros = torch.zeros_like(above[:, :1])
        return torch.cat([ones, above], 1) - torch.cat([above, zeros], 1)
    return torch.softmax(logits, dim=1)


def build_model(card: ModelCard, pretrained: str | None = None) -> NaktModel:
    """Build the untrained network a card describes (or load a foreign one) and wrap it."""
    name, rest = parse_spec(card.spec)
    if name == "run":
        raise NaktError(card.spec, "a run directory is loaded with nakt.load, not built")
    outputs = card.classes - 1 if card.head == "ordinal" else card.classes
    net, divisor = BUILDERS[name](rest, in_channels=card.in_channels, classes=outputs,
                                  spatial_dims=card.spatial_dims, pretrained=pretrained,
                                  **{k: v for k, v in card.model_kwargs.items() if v is not None})
    card.size_divisor = max(card.size_divisor, divisor)
    return NaktModel(net, card)
