"""``torchscript:<path>``: a foreign TorchScript model whose input contract comes from a sidecar JSON.

`foreign_card` is the sidecar logic shared by every foreign-file scheme (``torchscript:``, ``onnx:``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nakt.errors import NaktError
from nakt.models.card import ModelCard
from nakt.models.registry import NaktModel, scheme

__all__ = ["foreign_card", "load_torchscript", "sidecar_path"]


def sidecar_path(path: Path) -> Path | None:
    """The contract JSON beside a model file: ``<path>.json``, else ``<stem>.json``; None when neither exists."""
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate.is_file():
            return candidate
    return None


def foreign_card(path: str | Path, scheme_name: str, what: str, **contract) -> ModelCard:
    """The `ModelCard` of a foreign model file: keyword arguments `contract` (None values ignored) over its
    sidecar JSON. The file must exist (`what` names its kind in the error); a missing key names the sidecar.
    """
    path = Path(path)
    if not path.is_file():
        raise NaktError(path, f"{what} file not found")
    info: dict = {}
    side = sidecar_path(path)
    if side is not None:
        try:
            info = json.loads(side.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise NaktError(side, f"invalid JSON ({exc})") from None
        if not isinstance(info, dict):
            raise NaktError(side, "a model contract is a JSON object")
    info.update({k: v for k, v in contract.items() if v is not None})
    info["spec"] = f"{scheme_name}:{path}"
    return ModelCard.from_dict(info, source=str(side or path),
                               hint=f"give the input contract in {path.name}.json or as keyword arguments")


@scheme("torchscript", "load")
def load_torchscript(path: str | Path, **contract) -> NaktModel:
    """Load a TorchScript model. Its contract (``in_channels``, ``classes``, ``spatial_dims``, ``task``,
    ``label_values``, ``size``, ``patch``, ``normalization``, ``output``: ``logits`` or ``probs``...) comes from
    `contract`, over ``<path>.json`` or ``<stem>.json`` beside the file.
    """
    card = foreign_card(path, "torchscript", "TorchScript", **contract)
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise NaktError(path, f"cannot load TorchScript ({type(exc).__name__})") from None
    return NaktModel(net, card)
