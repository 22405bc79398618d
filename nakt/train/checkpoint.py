"""Per-epoch bookkeeping shared by the segmentation and classification loops: the best epoch's weights in
``run/model.safetensors``, ``run/metrics.json`` rewritten after every epoch, and a progress line."""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

from nakt.io import rundir

__all__ = ["BestEpoch"]


class BestEpoch:
    """Keeps the epoch with the highest validation score (the last epoch when there is no validation).

    `best_key` names the score in metrics.json (``best_val_dice``, ``best_val_score``); `extra` is written
    beside it (e.g. which metric the score is).
    """

    def __init__(self, run: Path, epochs: int, metric: str, best_key: str, extra: dict | None = None,
                 progress: bool = True):
        self.run, self.epochs, self.metric, self.best_key = run, epochs, metric, best_key
        self.extra, self.progress = extra or {}, progress
        self.history: list[dict] = []
        self.best: float | None = -1.0
        self.best_epoch = 0

    def update(self, model: nn.Module, entry: dict, score: float | None, note: str = "") -> None:
        """Record one epoch (`entry` holds ``epoch``, ``train_loss``, ``seconds``...); save `model` if best."""
        self.history.append(entry)
        if score is None or score > self.best:
            self.best, self.best_epoch = score, entry["epoch"]
            rundir.write_weights(self.run, model)
        rundir.write_metrics(self.run, {"history": self.history, self.best_key: self.best, **self.extra,
                                        "best_epoch": self.best_epoch})
        if self.progress:
            shown = "-" if score is None else f"{score:.4f}"
            loss = "-" if entry.get("train_loss") is None else f"{entry['train_loss']:.4f}"
            print(f"epoch {entry['epoch']}/{self.epochs}  loss {loss}  val {self.metric} {shown}{note}  "
                  f"{entry['seconds']:.1f}s", file=sys.stderr)

    def restore_best(self, model: nn.Module) -> None:
        """Load the best epoch's weights (the file `update` wrote) back into `model`."""
        model.load_state_dict(rundir.read_weights(self.run))
