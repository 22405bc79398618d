"""Recipes over the public API: pipelines of verbs that a study repeats.

`self_training` is the noisy-student loop (Xie et al. 2020) for segmentation: the teachers label the transferal
images; a student trains on those labels with strong augmentation; then, for each further round, the teachers and
the newest student label the images again (fused as `fusion` says, by default `nakt label`'s rule) and a fresh
student trains on the new labels.
Every round is a label set and a run directory under `out`, so each can be evaluated, reported and resumed like
any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nakt
from nakt.errors import NaktError
from nakt.io import outputs, rundir

__all__ = ["self_training"]

STRONG = {"augment": True, "spatial_augment": True}  # the "noise" of the noisy student


def self_training(teachers: Sequence[str], images: str, student: str, out: str, rounds: int = 2, *,
                  fusion: str | None = None, cases: str | None = None, label_options: dict | None = None,
                  train_options: dict | None = None, progress: bool = True) -> list[Path]:
    """Run `rounds` rounds of noisy-student self-training; returns the students' run directories in order.

    Round ``r`` writes ``out/round_<r>/labels`` (a label set: the `teachers`, plus the previous round's student
    from round 1 on) and ``out/round_<r>/student`` (the `student` spec trained on it with random flips, intensity
    jitter, rotations and scalings, and `train_options`). A round whose student is complete is kept, so an
    interrupted recipe continues where it stopped.
    """
    if rounds < 1:
        raise NaktError(None, f"rounds: must be at least 1, got {rounds}")
    if not teachers:
        raise NaktError(None, "no teacher given", "self-training starts from at least one teacher")
    root = Path(out)
    students: list[Path] = []
    for r in range(rounds):
        folder = root / f"round_{r}"
        run = folder / "student"
        members = [*map(str, teachers), *([str(students[-1])] if students else [])]
        if not outputs.holds_output(run, outputs.RUN) or not rundir.is_complete(run):
            labels = nakt.label(teacher=members, images=images, cases=cases, out=str(folder / "labels"),
                                fusion=fusion, progress=progress, **(label_options or {}))
            nakt.train(model=student, images=images, cases=cases, masks=str(labels), out=str(run),
                       overwrite=outputs.holds_output(run, outputs.RUN), progress=progress,
                       **{**STRONG, **(train_options or {})})
        students.append(run)
    return students
