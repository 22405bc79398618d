"""The predictions folder ``nakt predict`` writes: label maps (or ``predictions.csv``) and the marker
``predictions.json``, which lists the cases and says whether the folder is complete."""

from __future__ import annotations

from pathlib import Path

from nakt.io import outputs
from nakt.io.rundir import write_json
from nakt.version import __version__

__all__ = ["PREDICTIONS_FORMAT", "begin_predictions", "end_predictions"]

PREDICTIONS_FORMAT = "nakt.predictions/1"


def _write_marker(out: Path, model: str, cases: list[str], complete: bool, info: dict | None) -> None:
    write_json(out / outputs.PREDICTIONS.marker, {"format": PREDICTIONS_FORMAT, "nakt_version": __version__,
                                                  "complete": complete, "model": str(model), **(info or {}),
                                                  "cases": cases})


def begin_predictions(out: str | Path, model: str, cases: list[str], overwrite: bool = False,
                      info: dict | None = None) -> Path:
    """Claim `out` and mark it as an unfinished predictions folder of `model` listing the `cases` it will hold;
    `info` (e.g. ``{"batchnorm_folded": 30}``) is recorded beside the model."""
    out = Path(out)
    outputs.claim_output(out, outputs.PREDICTIONS, overwrite)
    _write_marker(out, model, cases, complete=False, info=info)
    return out


def end_predictions(out: str | Path, model: str, cases: list[str], info: dict | None = None) -> None:
    """Mark the predictions folder `out` complete."""
    _write_marker(Path(out), model, cases, complete=True, info=info)
