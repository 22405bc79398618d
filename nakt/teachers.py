"""Teachers: anything that gives class probabilities for a case on its image's grid.

A nakt run, a TorchScript or ONNX file and a MONAI bundle are networks (`NaktModel`) that nakt feeds itself
(`NetTeacher`); an nnU-Net model folder runs through nnU-Net's own predictor; predictions on disk (``masks:DIR``,
``probs:DIR``) are looked up by case name. They all meet in one small interface, `Teacher`, so that `label`,
`predict` and `evaluate` never ask what kind of teacher they hold, and teachers of any framework fuse.

Label spaces are reconciled by value: each teacher declares its label values (``card.label_values``, the
integers written in mask files); `common_label_values` checks that all teachers share one set and
`reorder` puts each teacher's probability channels into that common order.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from nakt.errors import NaktError
from nakt.fold import fold_batchnorm
from nakt.inference import infer_probs, resolve_precision
from nakt.io.dataset import Case
from nakt.io.images import Image
from nakt.models import ModelCard, NaktModel, load, spec_scheme

__all__ = ["NetTeacher", "Teacher", "common_label_values", "fold_pays", "load_teacher", "reading_orientation",
           "reorder", "runs_own_inference"]


class Teacher(Protocol):
    """What labelling needs of a teacher.

    `card` tells its task, spatial dimensions, label values (class index -> value in mask files) and, for nets
    nakt feeds, the orientation 3D volumes are read in. `case_probs` returns float32 probabilities
    ``[len(card.label_values), *image.spatial_shape]`` summing to 1 over the first axis, on `image`'s array grid
    (`image` is the case read by nakt; `case.images` are its files, for teachers that read them themselves).
    """

    spec: str
    card: ModelCard
    orientation: str | None  # the orientation 3D images must be read in; None: the teacher adapts to any

    def case_probs(self, case: Case, image: Image) -> np.ndarray: ...


class NetTeacher:
    """A network nakt feeds: its card's preprocessing, sliding windows or resizing, probabilities mapped back.
    `batchnorm_folded`: how many BatchNorms `load_teacher` folded into convolutions (`nakt.fold`);
    `compile_seconds`: the first batch's time once `nakt.batched.block_probs` compiled the network (else None)."""

    def __init__(self, spec: str, model: NaktModel, batchnorm_folded: int = 0):
        self.spec, self.model, self.card = spec, model, model.card
        self.orientation = model.card.orientation
        self.batchnorm_folded = batchnorm_folded
        self.compile_seconds: float | None = None

    def case_probs(self, case: Case, image: Image) -> np.ndarray:
        return infer_probs(self.model, image.array, case.images[0])


def load_teacher(spec: str, device: torch.device | str = "cpu", trust: bool = False, fold: bool = False) -> Teacher:
    """A teacher from any spec `nakt label` accepts: a run directory, ``torchscript:``, ``onnx:``, ``bundle:``,
    ``nnunet:``, ``masks:`` or ``probs:``. `trust` lets pickled checkpoints (nnU-Net's) load types beyond the
    allow-list (``--trust-checkpoint``).

    With `fold` a network's BatchNorms are folded into its convolutions (`nakt.fold.fold_batchnorm`): for a
    teacher that only infers in fp32 (`fold_pays`), never trained or saved, the folded model gives the same
    probabilities (within 1e-5) for less work. Under bf16/fp16 the folded weights round differently (labels
    would move with the trick), so those runs keep the network as trained."""
    entry, rest = spec_scheme(str(spec))
    if entry.teacher is None:
        model = load(spec)
        folded = fold_batchnorm(model) if fold else 0
        return NetTeacher(str(spec), model.to(device), folded)
    if trust and entry.name == "nnunet":
        rest += ("&" if "?" in rest else "?") + "trust=1"
    return entry.teacher(rest, str(spec), torch.device(device))


def fold_pays(precision: str, device: torch.device | str) -> bool:
    """Whether `load_teacher` should fold BatchNorms: only where it is exact, in fp32 (`precision` as given to
    `nakt.inference.resolve_precision`)."""
    return resolve_precision(precision, torch.device(device)) == "fp32"


def runs_own_inference(spec: str) -> bool:
    """Whether `spec` names a teacher that runs its own inference (nnU-Net, bundles, predictions on disk) rather
    than a network nakt feeds."""
    return spec_scheme(str(spec))[0].teacher is not None


def common_label_values(teachers: list[Teacher]) -> list[int]:
    """The label values all teachers share (sorted), or a one-line error listing both sides of a mismatch."""
    first = teachers[0]
    values = sorted(int(v) for v in first.card.label_values)
    for other in teachers[1:]:
        theirs = sorted(int(v) for v in other.card.label_values)
        if theirs != values:
            raise NaktError(other.spec, f"label values {theirs} differ from {first.spec}'s {values}",
                            "teachers must share one label space (map the values before fusing)")
        if other.card.spatial_dims != first.card.spatial_dims:
            raise NaktError(other.spec, f"is {other.card.spatial_dims}D, {first.spec} is {first.card.spatial_dims}D")
    return values


def reading_orientation(teachers: list[Teacher]) -> str:
    """The one orientation images are read in for these teachers: the one those that need one share (RAS when
    none needs one). 3D teachers that need different orientations cannot fuse on one grid."""
    needed = {t.spec: t.orientation for t in teachers if t.orientation is not None}
    if teachers[0].card.spatial_dims == 3 and len(set(needed.values())) > 1:
        (a, oa), (b, ob) = list(needed.items())[:2]
        raise NaktError(b, f"reads volumes in orientation {ob}, {a} in {oa}", "fused 3D teachers must share one")
    return next(iter(needed.values()), "RAS")


def reorder(probs: np.ndarray, own_values: list[int], values: list[int]) -> np.ndarray:
    """Probability channels ``[C, ...]`` in the order of `own_values` -> the order of `values` (same set).

    >>> reorder(np.array([[0.2], [0.8]]), [1, 0], [0, 1]).ravel().tolist()
    [0.8, 0.2]
    """
    own = [int(v) for v in own_values]
    if own == list(values):
        return probs
    return probs[[own.index(v) for v in values]]
