"""``torchscript:<path>``: a foreign TorchScript model whose input contract comes from a sidecar JSON.

`foreign_card` is the sidecar logic shared by every foreign-file scheme (``torchscript:``, ``onnx:``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nakt.errors import NaktError
from nakt.io.sidecar import read_sidecar, sidecar_path
from nakt.models.card import ModelCard
from nakt.models.registry import NaktModel, scheme

__all__ = ["foreign_card", "load_torchscript"]


def foreign_card(path: str | Path, scheme_name: str, what: str, **contract) -> ModelCard:
    """The `ModelCard` of a foreign model file: keyword arguments `contract` (None values ignored) over its
    sidecar JSON. The file must exist (`what` names its kind in the error); a missing key names the sidecar.
    """
    path = Path(path)
    if not path.is_file():
        raise NaktError(path, f"{what} file not found")
    side = sidecar_path(path)
    info = read_sidecar(side) if side is not None else {}
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
