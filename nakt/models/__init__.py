"""Model specs -> modules. `load` is the one entry point for anything that names a model."""

from __future__ import annotations

from pathlib import Path

from nakt.errors import NaktError
from nakt.models.card import ModelCard
from nakt.models.registry import SCHEMES, NaktModel, build_model, parse_spec, spec_scheme

__all__ = ["SCHEMES", "ModelCard", "NaktModel", "build_model", "load", "parse_spec", "spec_scheme"]


def load(spec: str | Path, **contract) -> NaktModel:
    """Load a trained model: a run directory, or ``torchscript:<path>`` / ``onnx:<path>`` (contract from
    kwargs over a sidecar JSON, ``<path>.json`` or ``<stem>.json``).

    A plain ``smp:``/``monai:`` spec builds an untrained network; it needs ``in_channels`` and ``classes``.

    >>> m = load("monai:UNet", in_channels=1, classes=2)
    >>> m(__import__("torch").zeros(1, 1, 20, 24)).shape
    torch.Size([1, 2, 20, 24])
    """
    spec = str(spec)
    entry, rest = spec_scheme(spec)
    if entry.load is not None:
        return entry.load(rest, **contract).eval()
    if entry.teacher is not None:  # nnunet:, bundle:, masks:, probs: run their own inference
        raise NaktError(None, f"{spec} is a teacher that runs its own inference, not a network",
                        "use it in nakt label / predict / evaluate, or nakt.teachers.load_teacher in Python")
    for key in ("in_channels", "classes"):
        if contract.get(key) is None:
            raise NaktError(None, f"{spec} is an untrained architecture; give {key}",
                            "teachers are run directories (nakt train), torchscript: or onnx: files")
    return build_model(ModelCard.from_dict({"spec": spec, **contract})).eval()
