"""What every task's training does around the engine, once: hold out validation items, claim the run directory,
build the student (a spec, a run to continue, ``--init`` weights), record the options, run `engine.fit` and mark
the run complete."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from nakt.errors import NaktError
from nakt.inference import pick_device
from nakt.io import outputs, rundir
from nakt.io.trainstate import clear_training_state, read_training_state
from nakt.models import ModelCard, NaktModel, build_model, load
from nakt.models.weights import load_pretrained
from nakt.sharding import current_share, on_first_part
from nakt.train.engine import FitOptions, Task, fit
from nakt.train.online import OnlineTeachers

__all__ = ["RUN_ONLY", "build_student", "finish_run", "has_epochs_to_resume", "loader_workers", "prepare_out",
           "record_of", "run_training", "split"]

# fields that describe how to run, not what is trained: a resumed run may change them
RUN_ONLY = {"resume", "progress", "device", "overwrite", "num_workers", "cache_gb", "disk_cache", "compile"}


def split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, validation): `fraction` of `items` held out at random (seeded); none when `fraction` is 0."""
    if fraction <= 0:
        return items, []
    if len(items) < 2:
        raise NaktError(None, f"{len(items)} training case(s): too few to hold out validation cases",
                        "give --val-images/--val-masks")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def memory_cache_gb(opts) -> float:
    """GiB of prepared training cases held in memory: `opts.cache_gb`, else none when segmentation keeps them
    on disk in the run folder (read back through the OS page cache: the process's memory stays flat however
    many cases there are), else 4."""
    if opts.cache_gb is not None:
        return opts.cache_gb
    return 0.0 if opts.task == "segmentation" and opts.disk_cache else 4.0


def loader_workers(given: int | None, streamed: bool) -> int:
    """DataLoader processes for training: `given`, else none when every training sample is held in memory (the
    main process then only crops and augments: on 2 cores, 0 workers trained 8% faster than 2, measured by
    benchmarks/training_throughput.py's setup) and half the CPU cores (at most 4) when samples are read from
    disk."""
    if given is not None:
        return given
    return min(4, max(1, (os.cpu_count() or 2) // 2)) if streamed else 0


def prepare_out(opts) -> None:
    """Claim the run directory: a new or empty folder, or (with --overwrite) a run of nakt's own. With --resume
    the folder must hold an unfinished run (checked by `nakt.train.resume_options`). Under torchrun rank 0
    claims it, the others waiting (its refusal is raised in every process)."""
    if not opts.resume:
        on_first_part(current_share(), lambda: outputs.claim_output(opts.out, outputs.RUN, opts.overwrite))


def record_of(opts) -> dict:
    """The options as config.json records them under ``training`` (without the how-to-run ones)."""
    return {k: v for k, v in asdict(opts).items() if k not in RUN_ONLY}


def build_student(opts, card: ModelCard, continued: str | None = None) -> NaktModel:
    """The model to train, on `opts.device`: the run `continued` (fine-tuning), else `card` built afresh (with
    `opts.pretrained` encoder weights); then every tensor of `opts.init` whose name and shape match."""
    torch.manual_seed(opts.seed)
    model = load(continued) if continued is not None else build_model(card, pretrained=opts.pretrained)
    if opts.init:  # e.g. a model of the same body part

        load_pretrained(model, Path(opts.init) / rundir.WEIGHTS)
    return model.to(current_share().device(pick_device(opts.device)))  # under torchrun: cuda:LOCAL_RANK


def run_training(opts, card: ModelCard, model: NaktModel, task: Task, record: dict,
                 teachers: OnlineTeachers | None = None, started: float | None = None) -> Path:
    """Write config.json (unfinished), train with the engine, and mark the run complete; returns ``opts.out``.
    Under torchrun every process trains (DDP) and rank 0 alone writes."""
    out = Path(opts.out)
    started = time.time() if started is None else started
    main = current_share().part == 0
    if not opts.resume and main:
        rundir.write_config(out, card, record, complete=False)
    metrics = fit(model, task, out, FitOptions.of(opts), teachers, resume=has_epochs_to_resume(out, opts.resume))
    if main:
        finish_run(out, card, record, metrics, started, opts.resume)
    return out


def has_epochs_to_resume(out: Path, resume: bool) -> bool:
    """With --resume, whether a finished epoch was saved; a run stopped during its first epoch starts over."""
    return resume and read_training_state(out) is not None


def finish_run(out: Path, card: ModelCard, record: dict, metrics: dict, started: float, resumed: bool) -> None:
    """Mark a run complete: wall time into metrics.json, ``complete`` into config.json, the resume state gone.
    (A resumed run's ``wall_seconds`` counts the resuming process only; ``resumed`` says so.)"""
    rundir.write_metrics(out, {**metrics, "wall_seconds": round(time.time() - started, 1), "resumed": resumed})
    rundir.write_config(out, card, record, complete=True)
    clear_training_state(out)
    rundir.remove_prepared_cases(out)
