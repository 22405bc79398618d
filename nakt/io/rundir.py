"""Run directories: ``config.json`` (the model card), ``model.safetensors`` and ``metrics.json``.

This is the only module that reads or writes them (the loops' resume state aside, `nakt.train.checkpoint`).
Every file is written atomically. config.json is written when training starts with ``"complete": false`` and
rewritten with ``true`` when it ends; an unfinished run is refused wherever a trained model is expected.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nakt.errors import NaktError
from nakt.io.outputs import atomic_path
from nakt.models.card import ModelCard
from nakt.models.weights import read_state_dict
from nakt.version import __version__

__all__ = [
    "RUN_FORMAT",
    "is_complete",
    "read_config",
    "prepared_cases",
    "read_json",
    "read_metrics",
    "best_score",
    "read_weights",
    "read_prepared_case",
    "remove_prepared_cases",
    "write_prepared_case",
    "write_config",
    "write_json",
    "write_metrics",
    "write_weights",
]

RUN_FORMAT = "nakt.run/1"
CONFIG, WEIGHTS, METRICS = "config.json", "model.safetensors", "metrics.json"
PREPARED = "prepared"  # training cases prepared for the network, kept while training runs (and across --resume)
PREPARED_MARKER, PREPARED_FORMAT = "prepared.json", "nakt.prepared/1"


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n", encoding="utf-8")


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: Path, hint: str = "is this a run directory written by nakt train?") -> dict:
    """A JSON object written by nakt (or a framework it reads); a missing or broken file is one line naming it,
    with `hint` when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise NaktError(path, "not found", hint)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise NaktError(path, f"invalid JSON ({exc})") from None


def write_config(run: Path, card: ModelCard, training: dict, complete: bool = True) -> None:
    write_json(Path(run) / CONFIG, {"format": RUN_FORMAT, "nakt_version": __version__, "complete": complete,
                                    **card.to_dict(), "training": training})


def is_complete(run: Path) -> bool:
    """True unless config.json says training has not finished (runs written before the flag count as done)."""
    return read_json(Path(run) / CONFIG).get("complete", True) is not False


def read_config(run: Path, require_complete: bool = True) -> tuple[ModelCard, dict]:
    """The model card and training record of a run; an unfinished run is refused unless `require_complete`
    is False, with the command that resumes it."""
    path = Path(run) / CONFIG
    data = read_json(path)
    if not str(data.get("format", "")).startswith("nakt.run/"):
        raise NaktError(path, f"unknown format {data.get('format')!r}", f"expected {RUN_FORMAT}")
    if require_complete and data.get("complete", True) is False:
        done = len(read_metrics(Path(run)).get("history", []))
        epochs = data.get("training", {}).get("epochs", "?")
        raise NaktError(run, f"training did not finish ({done} of {epochs} epochs done)",
                        f"resume it with: nakt train --out {run} --resume")
    return ModelCard.from_dict(data, source=str(path)), data.get("training", {})


def write_weights(run: Path, module: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(Path(run) / WEIGHTS) as tmp:
        save_file(state, str(tmp))


def read_weights(run: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(Path(run) / WEIGHTS)


def prepared_cases(run: Path, part: str) -> Path:
    """The folder of a run's prepared `part` (``train``/``val``) cases: written during training, removed when it
    ends (`remove_prepared_cases`). Marks ``prepared/`` as nakt's, so that the removal never takes a user's."""
    folder = Path(run) / PREPARED
    if not (folder / PREPARED_MARKER).is_file():
        write_json(folder / PREPARED_MARKER, {"format": PREPARED_FORMAT})
    return folder / part


def write_prepared_case(path: Path, prepared: dict[str, torch.Tensor]) -> None:
    """One prepared training case (image, targets: tensors only) at `path` in `prepared_cases`, atomically (each
    writer has its own temporary file, renamed into place)."""
    with atomic_path(path) as tmp:
        torch.save(prepared, tmp)


def read_prepared_case(path: Path) -> dict[str, torch.Tensor]:
    """A case `write_prepared_case` wrote (tensors only: nothing is unpickled)."""
    return torch.load(path, weights_only=True)


def remove_prepared_cases(run: Path) -> None:
    """Remove a run's ``prepared/`` folder if nakt marked it (`prepared_cases`); anything else stays."""
    import shutil

    folder = Path(run) / PREPARED
    try:
        marked = json.loads((folder / PREPARED_MARKER).read_text(encoding="utf-8")).get("format") == PREPARED_FORMAT
    except (OSError, ValueError, AttributeError):
        return
    if marked and not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)


def write_metrics(run: Path, metrics: dict) -> None:
    write_json(Path(run) / METRICS, {"format": "nakt.metrics/1", **metrics})


def read_metrics(run: Path) -> dict:
    path = Path(run) / METRICS
    return read_json(path) if path.is_file() else {}


def best_score(metrics: dict) -> tuple[float | None, str]:
    """The best validation score of a run's metrics.json and its metric's name (``dice``, ``auc``); None when the
    run had no validation. Runs written before the one key (``best_val_dice`` for segmentation,
    ``best_val_score`` without a metric) read the same."""
    if "best_val_dice" in metrics and "best_val_score" not in metrics:
        return metrics["best_val_dice"], "dice"
    return metrics.get("best_val_score"), metrics.get("best_val_metric", "dice")
