"""Model specs -> modules. `load` is the one entry point for anything that names a model."""

from __future__ import annotations

from pathlib import Path

from nakt.errors import NaktError
from nakt.models.card import ModelCard
from nakt.models.registry import BUILDERS, NaktModel, build_model, parse_spec

__all__ = ["BUILDERS", "ModelCard", "NaktModel", "build_model", "load", "parse_spec"]


def load(spec: str | Path, **contract) -> NaktModel:
    """Load a trained model: a run directory, or ``torchscript:<path>`` / ``onnx:<path>`` (contract from
    kwargs over a sidecar JSON, ``<path>.json`` or ``<stem>.json``).

    A plain ``smp:``/``monai:`` spec builds an untrained network; it needs ``in_channels`` and ``classes``.

    >>> m = load("monai:UNet", in_channels=1, classes=2)
    >>> m(__import__("torch").zeros(1, 1, 20, 24)).shape
    torch.Size([1, 2, 20, 24])
    """
    from nakt.io import rundir

    spec = str(spec)
    scheme_name, rest = parse_spec(spec)
    if scheme_name == "run":
        card, _ = rundir.read_config(Path(rest))
        model = build_model(card)
        state = rundir.read_weights(Path(rest))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise NaktError(Path(rest) / rundir.WEIGHTS, "weights do not fit config.json's model",
                            str(exc).splitlines()[0]) from None
        return model.eval()
    if scheme_name == "torchscript":
        from nakt.models.torchscript import load_torchscript

        return load_torchscript(rest, **contract).eval()
    if scheme_name == "onnx":
        from nakt.models.onnx import load_onnx

        return load_onnx(rest, **contract).eval()
    if scheme_name not in BUILDERS:  # nnunet:, bundle:, masks:, probs: run their own inference
        raise NaktError(None, f"{spec} is a teacher that runs its own inference, not a network",
                        "use it in nakt label / predict / evaluate, or nakt.teachers.load_teacher in Python")
    for key in ("in_channels", "classes"):
        if contract.get(key) is None:
            raise NaktError(None, f"{spec} is an untrained architecture; give {key}",
                            "teachers are run directories (nakt train), torchscript: or onnx: files")
    return build_model(ModelCard.from_dict({"spec": spec, **contract})).eval()
