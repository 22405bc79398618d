"""The resume state of a training run, ``run/training_state.pt``: what the engine needs to continue an
interrupted run exactly (weights, optimiser, scheduler, random states, the best-so-far), written atomically
after every epoch and loaded without unpickling code. `nakt.train.checkpoint` decides what goes in it and when.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nakt.errors import NaktError
from nakt.io.outputs import atomic_path

__all__ = ["STATE_FORMAT", "TRAINING_STATE", "clear_partial_states", "clear_training_state", "read_training_state",
           "save_training_state"]

TRAINING_STATE = "training_state.pt"
STATE_FORMAT = "nakt.training_state/1"


def save_training_state(run: Path, state: dict) -> None:
    """Write `state` (tensors, numbers, strings, lists, dicts only) to ``run/training_state.pt`` atomically."""
    with atomic_path(Path(run) / TRAINING_STATE) as tmp:
        torch.save({"format": STATE_FORMAT, **state}, tmp)


def read_training_state(run: Path) -> dict | None:
    """The state `save_training_state` wrote (tensors on the CPU), or None if there is none. Loaded with
    ``weights_only=True``: no code is unpickled."""
    path = Path(run) / TRAINING_STATE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...: many types
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise NaktError(path, f"unreadable training state ({type(exc).__name__}: {problem[:200]})",
                        "delete it and train again without --resume") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise NaktError(path, f"not a training state (format {found!r})", f"expected {STATE_FORMAT}")
    return state


def clear_training_state(run: Path) -> None:
    """Remove the resume state (once the run is complete), and any half-written one a kill left behind."""
    clear_partial_states(run)
    (Path(run) / TRAINING_STATE).unlink(missing_ok=True)


def clear_partial_states(run: Path) -> None:
    """Remove the temporary files of state writes a kill cut off (`atomic_path` names them ``.tmp-*``)."""
    for tmp in Path(run).glob(f".tmp-*{TRAINING_STATE}"):
        tmp.unlink(missing_ok=True)
