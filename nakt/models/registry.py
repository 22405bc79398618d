"""One registry from model specs (``scheme:name``) to what each scheme gives, and `NaktModel`, the one model
contract.

A scheme gives one of three things (`Scheme`): `build`, an untrained architecture (``smp``, ``monai``, ``timm``,
``torchvision``) with the signature ``build(name, *, in_channels, classes, spatial_dims, pretrained=None, **kw)
-> (module, size_divisor)``; `load`, a trained network from a file or folder (``run``, ``torchscript``,
``onnx``) as ``load(rest, **contract) -> NaktModel``; or `teacher`, a model that runs its own inference
(``nnunet``, ``bundle``, ``masks``, ``probs``) as ``teacher(rest, spec, device) -> Teacher``. `NaktModel`
wraps networks so that every model maps ``[B, C_in, *spatial]`` of any size to logits ``[B, C, *spatial]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nakt.errors import NaktError
from nakt.models.card import ModelCard

__all__ = ["SCHEMES", "SCHEME_MODULES", "NaktModel", "Scheme", "build_model", "logits_to_probs", "parse_spec",
           "register_all", "scheme", "spec_scheme"]

# modules that register schemes when imported (optional dependencies are imported inside their functions)
SCHEME_MODULES = ["nakt.models.classifiers", "nakt.models.monai_nets", "nakt.models.smp_nets",
                  "nakt.models.torchscript", "nakt.models.onnx", "nakt.models.run", "nakt.models.bundle",
                  "nakt.disk_teachers", "nakt.models.nnunet"]


@dataclasses.dataclass(frozen=True)
class Scheme:
    """What specs ``name:<rest>`` give: exactly one of `build`, `load` or `teacher` (see the module docstring)."""

    name: str
    build: Callable | None = None
    load: Callable | None = None
    teacher: Callable | None = None


SCHEMES: dict[str, Scheme] = {}


def scheme(name: str, kind: str = "build") -> Callable:
    """Register the function of scheme `name`: ``build`` (an architecture), ``load`` (a trained network) or
    ``teacher`` (a model that runs its own inference)."""

    def register(fn: Callable) -> Callable:
        SCHEMES[name] = Scheme(name, **{kind: fn})
        return fn

    return register


def register_all() -> None:
    """Import every scheme module, so `SCHEMES` is complete."""
    import importlib

    for module in SCHEME_MODULES:
        importlib.import_module(module)


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``"smp:Unet/resnet18"`` into ``("smp", "Unet/resnet18")``; a folder is a run directory.

    >>> parse_spec("smp:Unet/resnet18")
    ('smp', 'Unet/resnet18')
    """
    register_all()
    if Path(spec).is_dir():
        return "run", spec
    if ":" not in spec and ("/" in spec or "\\" in spec):
        raise NaktError(spec, "run directory not found")
    valid = ", ".join(sorted(SCHEMES))
    if ":" not in spec:
        raise NaktError(None, f"unknown model spec {spec!r}", f"use scheme:name with scheme one of {valid}, or a "
                        "run directory")
    name, rest = spec.split(":", 1)
    if name not in SCHEMES:
        raise NaktError(None, f"unknown model scheme {name!r} in {spec!r}", f"valid: {valid}, or the path of a run "
                        "directory")
    return name, rest


def spec_scheme(spec: str) -> tuple[Scheme, str]:
    """The registered `Scheme` of `spec` and the rest of the spec after ``name:``."""
    name, rest = parse_spec(str(spec))
    return SCHEMES[name], rest


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
    """Build the untrained network a card describes and wrap it. The card is not changed: the wrapped model
    carries a copy whose `size_divisor` is at least the network's."""
    entry, rest = spec_scheme(card.spec)
    if entry.build is None:
        raise NaktError(card.spec, f"a {entry.name} model is loaded, not built", "use nakt.load(spec)")
    outputs = card.classes - 1 if card.head == "ordinal" else card.classes
    net, divisor = entry.build(rest, in_channels=card.in_channels, classes=outputs, spatial_dims=card.spatial_dims,
                               pretrained=pretrained, **{k: v for k, v in card.model_kwargs.items() if v is not None})
    return NaktModel(net, dataclasses.replace(card, size_divisor=max(card.size_divisor, divisor)))
