"""``torchscript:<path>``: a foreign TorchScript model whose input contract comes from a sidecar JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nakt.errors import NaktError
from nakt.models.card import ModelCard
from nakt.models.registry import NaktModel, scheme

__all__ = ["load_torchscript"]


@scheme("torchscript")
def build_torchscript(name: str, **kw):
    raise NaktError(name, "a TorchScript model is loaded, not built", "use nakt.load('torchscript:PATH')")


def _sidecar(path: Path) -> Path | None:
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate.is_file():
            return candidate
    return None


def load_torchscript(path: str | Path, **contract) -> NaktModel:
    """Load a TorchScript segmentation model. Its contract (``in_channels``, ``classes``, ``spatial_dims``,
    ``label_values``, ``size``, ``patch``, ``normalization``, ``output``: ``logits`` or ``probs``) comes from
    `contract`, over ``<path>.json`` or ``<stem>.json`` beside the file.
    """
    path = Path(path)
    if not path.is_file():
        raise NaktError(path, "TorchScript file not found")
    info: dict = {}
    side = _sidecar(path)
    if side is not None:
        try:
            info = json.loads(side.read_text())
        except json.JSONDecodeError as exc:
            raise NaktError(side, f"invalid JSON ({exc})") from None
    info.update({k: v for k, v in contract.items() if v is not None})
    info["spec"] = f"torchscript:{path}"
    card = ModelCard.from_dict(info, source=str(side or path),
                               hint=f"give the input contract in {path.name}.json or as keyword arguments")
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise NaktError(path, f"cannot load TorchScript ({type(exc).__name__})") from None
    return NaktModel(net, card)
