"""Per-epoch bookkeeping of the training engine (`nakt.train.engine`): the best epoch's weights in
``run/model.safetensors``, ``run/metrics.json`` rewritten after every epoch, a progress line, and the resume
state ``run/training_state.pt`` that lets an interrupted run continue exactly where it stopped.

Order of the writes after each epoch, so that a SIGKILL at any moment leaves a resumable run:

1. ``training_state.pt`` (atomic) holds the epoch's end state *including* the best-so-far decision and
   history with this epoch in them;
2. ``model.safetensors`` when this epoch is the new best;
3. ``metrics.json``.

Every file is replaced atomically, so each holds a complete version. A kill before (1) leaves the previous
epoch's state, and the best weights and metrics it describes were written before it (steps 2-3 of an earlier
epoch happen before the next epoch's step 1); resuming replays the epoch. A kill after (1) but before (2) or
(3) leaves a state whose best weights or metrics were not yet written: resuming rewrites both from the state
(when the state's epoch is the best one, its end-of-epoch model *is* the best model). So the files never need
replaying to be right, and a GPU run, whose replay is not bit-exact, still resumes consistently.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nakt.errors import NaktError
from nakt.io import rundir
from nakt.io.trainstate import (
    TRAINING_STATE,
    clear_partial_states,
    read_training_state,
    save_training_state,
)

__all__ = ["BestEpoch", "TrainingState"]



class BestEpoch:
    """Keeps the epoch with the highest validation score (the last epoch when there is no validation).

    metrics.json holds the score as ``best_val_score`` and its name (`metric`: ``dice``, ``auc``) as
    ``best_val_metric`` whatever the task; `extra` is written beside them (e.g. the precision trained in).
    Only the `main` process of a distributed run writes files and progress; the others keep the history.
    """

    def __init__(self, run: Path, epochs: int, metric: str, extra: dict | None = None, progress: bool = True,
                 main: bool = True):
        self.run, self.epochs, self.metric = run, epochs, metric
        self.extra, self.progress, self.main = extra or {}, progress and main, main
        self.history: list[dict] = []
        self.best: float | None = -1.0
        self.best_epoch = 0

    def update(self, model: nn.Module, entry: dict, score: float | None, note: str = "",
               state: TrainingState | None = None) -> None:
        """Record one epoch (`entry` holds ``epoch``, ``train_loss``, ``seconds``...); save `model` if best.
        The loop's `state` is saved once the decision is made, before any other file is written (see the
        module docstring for why)."""
        self.history.append(entry)
        is_best = score is None or score > self.best
        if is_best:
            self.best, self.best_epoch = score, entry["epoch"]
        if state is not None and self.main:
            state.save(entry["epoch"])
        self.write(model if is_best else None)
        if self.progress:
            shown = "-" if score is None else f"{score:.4f}"
            loss = "-" if entry.get("train_loss") is None else f"{entry['train_loss']:.4f}"
            print(f"epoch {entry['epoch']}/{self.epochs}  loss {loss}  val {self.metric} {shown}{note}  "
                  f"{entry['seconds']:.1f}s", file=sys.stderr)

    def write(self, best_model: nn.Module | None) -> None:
        """Write `best_model` (if given) as the best weights, then metrics.json from the history."""
        if not self.main:
            return
        if best_model is not None:
            rundir.write_weights(self.run, best_model)
        rundir.write_metrics(self.run, {"history": self.history, "best_val_score": self.best,
                                        "best_val_metric": self.metric, **self.extra, "best_epoch": self.best_epoch})

    def restore_best(self, model: nn.Module) -> None:
        """Load the best epoch's weights (the file `update` wrote) back into `model`."""
        model.load_state_dict(rundir.read_weights(self.run))

    def state_dict(self) -> dict:
        """The best-so-far: score, epoch and the history (plain numbers, strings and lists)."""
        return {"history": self.history, "best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.best, self.best_epoch = list(state["history"]), state["best"], state["best_epoch"]


class TrainingState:
    """What a training loop needs to continue after its last finished epoch exactly as if never stopped.

    Saved after every epoch: the epoch number and the epoch count; the state dicts of `stateful` (the model's
    weights at the end of the epoch, not the best ones; the optimizer; the LR schedule, whose one-cycle
    position is per step; an EMA model with its update count); the bit-generator state of each numpy
    Generator in `generators` (the epoch plans, whose per-sample seeds decide crops and augmentation; teacher
    draws); torch's global RNG (and CUDA's when in use); and `log`'s best-so-far
    (score, epoch, history). The data and model architecture are not saved: the caller rebuilds them from the
    run's options.
    """

    def __init__(self, run: Path, epochs: int, log: BestEpoch, stateful: dict[str, object],
                 generators: dict[str, np.random.Generator]):
        self.run, self.epochs, self.log = Path(run), epochs, log
        self.stateful = {k: v for k, v in stateful.items() if v is not None}
        self.generators = generators

    def save(self, epoch: int) -> None:
        """Write the state after `epoch` (see `BestEpoch.update` for when)."""
        save_training_state(self.run, {
            "epoch": epoch, "epochs": self.epochs,
            "state_dicts": {k: v.state_dict() for k, v in self.stateful.items()},
            "generators": {k: g.bit_generator.state for k, g in self.generators.items()},
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "best": self.log.state_dict()})

    def resume(self, scored: nn.Module) -> int:
        """Restore everything from the saved state and return its epoch (the loop goes on with the next).

        Rewrites the best weights (from `scored`, the module the loop scores, when the saved epoch was the
        best) and metrics.json, which a kill may have cut off after the state was written."""
        clear_partial_states(self.run)
        state = read_training_state(self.run)
        path = self.run / TRAINING_STATE
        if state is None:
            raise NaktError(self.run, "nothing to resume: no training state",
                            "the run finished, or was stopped before its first epoch ended")
        if state["epochs"] != self.epochs:
            raise NaktError(path, f"saved by a run of {state['epochs']} epochs, resumed with {self.epochs}",
                            "resume with the run's own options")
        try:
            for name, obj in self.stateful.items():
                obj.load_state_dict(state["state_dicts"][name])
            for name, g in self.generators.items():
                g.bit_generator.state = state["generators"][name]
            torch.set_rng_state(state["torch_rng"])
            if state["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            self.log.load_state_dict(state["best"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NaktError(path, f"does not fit this model and options ({problem[:200]})",
                            "resume with the run's own options") from None
        self.log.write(scored if self.log.best_epoch == state["epoch"] else None)
        return int(state["epoch"])
