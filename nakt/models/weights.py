"""Loading weights without unpickling code: safetensors, or torch.load(weights_only=True)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from nakt.errors import NaktError

__all__ = ["load_pretrained", "read_state_dict"]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch checkpoint (tensors only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise NaktError(path, "weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message is 6-8 lines of advice to turn the safety off
        raise NaktError(path, "holds pickled Python objects besides tensors: refused, since loading them could "
                        "run code", "save a plain state dict or safetensors") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise NaktError(path, f"cannot read weights ({type(exc).__name__}: {first})") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise NaktError(path, "weights file does not hold a state dict")
    return state


def load_pretrained(module: nn.Module, path: str | Path) -> int:
    """Load a local weights file into `module`, keeping tensors whose names and shapes match; returns how many.

    A few mismatches are expected and skipped (a 3-channel stem for a 1-channel model, another head). The file
    must fit the module on the whole, though: when fewer than half of its tensors match, it belongs to another
    architecture (or another naming), and loading the few that happen to match would silently train from
    scratch, so it is refused.
    """
    state = read_state_dict(path)
    own = module.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched or len(matched) < len(state) / 2:
        raise NaktError(path, f"only {len(matched)} of its {len(state)} tensors match {type(module).__name__}'s "
                        "parameters by name and shape", "weights of another architecture?")
    module.load_state_dict(matched, strict=False)
    return len(matched)
