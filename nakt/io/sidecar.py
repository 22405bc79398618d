"""The contract beside a network file (``model.onnx.json`` or ``model.json``): input channels, classes, size or
spacing, normalisation, label values... `nakt export` writes it (``"format": "nakt.export/1"``); for any other
TorchScript or ONNX file a user writes it by hand, and ``torchscript:`` / ``onnx:`` read it."""

from __future__ import annotations

import json
from pathlib import Path

from nakt.errors import NaktError
from nakt.io.rundir import write_json
from nakt.version import __version__

__all__ = ["EXPORT_FORMAT", "is_nakt_export", "read_sidecar", "sidecar_path", "write_sidecar"]

EXPORT_FORMAT = "nakt.export/1"


def sidecar_path(path: Path) -> Path | None:
    """The contract JSON beside a model file: ``<path>.json``, else ``<stem>.json``; None when neither exists."""
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate.is_file():
            return candidate
    return None


def read_sidecar(side: Path) -> dict:
    """A contract JSON as a dict (one line naming the file when it is not a JSON object)."""
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise NaktError(side, f"invalid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise NaktError(side, "a model contract is a JSON object")
    return info


def is_nakt_export(side: Path) -> bool:
    """Whether `side` is a contract `write_sidecar` wrote (so the export beside it is nakt's to replace)."""
    try:
        return str(json.loads(side.read_text(encoding="utf-8")).get("format", "")).startswith("nakt.export/")
    except (OSError, ValueError, AttributeError):
        return False


def write_sidecar(side: Path, contract: dict) -> None:
    """Write an export's contract (stamped with its format and the nakt version) to `side`."""
    write_json(side, {"format": EXPORT_FORMAT, "nakt_version": __version__, **contract})
