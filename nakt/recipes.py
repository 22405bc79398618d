"""Recipes over the public API: pipelines of verbs that a study repeats.

`self_training` is the noisy-student loop (Xie et al. 2020) for segmentation: the teachers label the transferal
images; a student trains on those labels with strong augmentation; then, for each further round, the teachers and
the newest student label the images again (fused as `fusion` says, by default `nakt label`'s rule) and a fresh
student trains on the new labels.
Every round is a label set and a run directory under `out`, so each can be evaluated, reported and resumed like
any other.

Stability filtering (as FLARE22's rounds and Naive-Student drop unreliable pseudo-labels): a case whose fused
labels changed between the previous round and this one (foreground Dice between the two rounds' masks below
`min_stability`), or that is among the `drop_disputed` share of cases the teachers disagree on most (the report's
review queue), is left out of that round's student; ``round_<r>/filter.json`` records each case's scores and the
cases dropped, ``round_<r>/kept.txt`` the cases trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

import nakt
from nakt.errors import NaktError
from nakt.io import labelset, outputs, rundir
from nakt.io.images import read_mask
from nakt.metrics import case_scores
from nakt.preprocess import encode_labels

__all__ = ["self_training", "stable_cases"]

STRONG = {"augment": True, "spatial_augment": True}  # the "noise" of the noisy student


def self_training(teachers: Sequence[str], images: str, student: str, out: str, rounds: int = 2, *,
                  fusion: str | None = None, cases: str | None = None, label_options: dict | None = None,
                  train_options: dict | None = None, min_stability: float | None = None,
                  drop_disputed: float = 0.0, progress: bool = True) -> list[Path]:
    """Run `rounds` rounds of noisy-student self-training; returns the students' run directories in order.

    Round ``r`` writes ``out/round_<r>/labels`` (a label set: the `teachers`, plus the previous round's student
    from round 1 on) and ``out/round_<r>/student`` (the `student` spec trained on it with random flips, intensity
    jitter, rotations and scalings, and `train_options`, which may add a labelled set: ``labelled_images``...).
    A round whose student is complete is kept, so an interrupted recipe continues where it stopped. With
    `min_stability` or `drop_disputed`, the round's student trains on the cases `stable_cases` keeps.
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
            trained = cases
            if min_stability is not None or drop_disputed > 0:
                previous = root / f"round_{r - 1}" / "labels" if r else None
                trained = str(stable_cases(labels, previous, folder, min_stability, drop_disputed))
            nakt.train(model=student, images=images, cases=trained, masks=str(labels), out=str(run),
                       overwrite=outputs.holds_output(run, outputs.RUN), progress=progress,
                       **{**STRONG, **(train_options or {})})
        students.append(run)
    return students


def stable_cases(labels: Path, previous: Path | None, folder: Path, min_stability: float | None = None,
                 drop_disputed: float = 0.0) -> Path:
    """The cases of label set `labels` a student should train on: without those whose labels changed from the
    `previous` round's label set (foreground Dice between the two masks below `min_stability`; round 0 has no
    previous one) and the `drop_disputed` share with the teachers' lowest mean pairwise Dice. Writes
    ``folder/filter.json`` (per case: ``stability``, ``teachers_dice``; the ``dropped`` cases with the reason)
    and ``folder/kept.txt``; returns the latter."""
    manifest = labelset.read_manifest(labels)
    values = [int(v) for v in manifest["label_values"]]
    before_cases = labelset.read_manifest(previous)["cases"] if previous is not None else {}
    scores = {}
    for name, record in manifest["cases"].items():
        entry = {"teachers_dice": record.get("agreement", {}).get("pairwise_dice", 1.0), "stability": None}
        if name in before_cases:
            before = read_mask(previous / before_cases[name]["mask"])
            now = read_mask(labels / record["mask"])
            entry["stability"] = case_scores(encode_labels(now, values), encode_labels(before, values), len(values),
                                             hd95=False)["dice"]
        scores[name] = entry
    dropped = {}
    if min_stability is not None:
        dropped.update({n: "unstable" for n, e in scores.items()
                        if e["stability"] is not None and e["stability"] < min_stability})
    most_disputed_first = sorted(scores, key=lambda n: (scores[n]["teachers_dice"], n))
    disputed = most_disputed_first[:int(np.floor(drop_disputed * len(scores)))]
    dropped.update({n: dropped.get(n, "disputed") for n in disputed})
    kept = [n for n in scores if n not in dropped]
    if not kept:
        raise NaktError(labels, f"stability filtering drops all {len(scores)} cases",
                        "lower min_stability or drop_disputed")
    rundir.write_json(folder / "filter.json", {"min_stability": min_stability, "drop_disputed": drop_disputed,
                                               "previous": None if previous is None else str(previous),
                                               "cases": scores, "dropped": dropped, "kept": len(kept)})
    (folder / "kept.txt").write_text("".join(f"{n}\n" for n in kept), encoding="utf-8")
    return folder / "kept.txt"
