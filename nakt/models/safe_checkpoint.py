"""Reading pickled PyTorch checkpoints without running their code: ``torch.load(weights_only=True)`` plus an
explicit allow-list of the few non-tensor types a known writer stores, scoped to one call.

A pickle can name any importable function and have it called while loading (``os.system``, say). PyTorch's
weights-only unpickler refuses every global outside its own list of tensor and container types; nnU-Net's
trainer additionally stores numpy scalars (its logged Dice and loss values, ``_best_ema``), so loading its
checkpoints needs exactly `NNUNET_GLOBALS`. Anything else is refused with one line, unless the user says they
trust the file.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nakt.errors import NaktError

__all__ = ["NNUNET_GLOBALS", "TRUST_HINT", "load_checkpoint"]

TRUST_HINT = "load it only if you trust its source: add ?trust=1 to the spec (or pass --trust-checkpoint)"


def _numpy_globals() -> list[Callable | tuple[Callable, str]]:
    """numpy's scalar constructor, `np.dtype` and the numeric dtype classes (``np.dtypes.Float32DType``...): what
    a pickled ``np.float32(0.8)`` is rebuilt from. Object and string dtypes are left out.

    numpy 2 pickles the scalar constructor as ``numpy._core.multiarray.scalar``, numpy 1 as
    ``numpy.core.multiarray.scalar``; both names are allowed so checkpoints from either load.
    """
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    numeric = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    return [np.dtype, *numeric, scalar, (scalar, "numpy.core.multiarray.scalar"),
            (scalar, "numpy._core.multiarray.scalar")]


# What nnUNetTrainer.save_checkpoint pickles besides tensors, dicts, lists, numbers, strings and torch.device
# (found by loading a checkpoint written by nnU-Net 2.8's trainer: get_unsafe_globals_in_checkpoint names
# numpy.dtype and the scalar constructor; the dtype's class, e.g. Float32DType, is asked for while building it).
NNUNET_GLOBALS = _numpy_globals()


def load_checkpoint(path: str | Path, allow: Sequence[Callable | tuple[Callable, str]] = (),
                    trust: bool = False) -> Any:
    """Unpickle a PyTorch checkpoint onto the CPU, allowing only tensors, plain containers and `allow`.

    With `trust`, the file is unpickled without restriction (it may run code: only for files the user trusts).
    Refusals and unreadable files raise a one-line `NaktError` naming the file and, for refusals, the global.
    """
    path = Path(path)
    if not path.is_file():
        raise NaktError(path, "not found")
    try:
        if trust:
            return torch.load(str(path), map_location="cpu", weights_only=False)
        # the allow-list holds for this call only: add_safe_globals would widen every later torch.load
        with torch.serialization.safe_globals(list(allow)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on pickle protocols: the outcome says enough
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # PyTorch's message is several lines of advice ending in how to turn the check off; keep the global
        found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(exc))
        what = f"pickles {found.group(1) or found.group(2)}" if found else "pickles Python objects"
        raise NaktError(path, f"refused: it {what}, which nakt does not load (unpickling it could run code)",
                        TRUST_HINT) from None
    except Exception as exc:  # truncated or foreign files raise many types (RuntimeError, EOFError, zip errors)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise NaktError(path, f"cannot read checkpoint ({type(exc).__name__}: {first})") from None
