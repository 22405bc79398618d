"""A run directory (what ``nakt train`` writes) as a trained network: its config.json's card, rebuilt, with its
safetensors weights."""

from __future__ import annotations

from pathlib import Path

from nakt.errors import NaktError
from nakt.io import rundir
from nakt.models.registry import NaktModel, build_model, scheme

__all__ = ["load_run"]


@scheme("run", "load")
def load_run(folder: str | Path, **contract) -> NaktModel:
    """The trained model of run directory `folder` (`contract` is ignored: the run describes itself)."""
    folder = Path(folder)
    card, _ = rundir.read_config(folder)
    model = build_model(card)
    try:
        model.load_state_dict(rundir.read_weights(folder))
    except RuntimeError as exc:
        raise NaktError(folder / rundir.WEIGHTS, "weights do not fit config.json's model",
                        str(exc).splitlines()[0]) from None
    return model
