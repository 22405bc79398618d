"""Teachers: anything that gives class probabilities for a case on its image's grid.

A nakt run, a TorchScript or ONNX file and a MONAI bundle are networks (`NaktModel`) that nakt feeds itself
(`NetTeacher`); an nnU-Net model folder runs through nnU-Net's own predictor; predictions on disk (``masks:DIR``,
``probs:DIR``) are looked up by case name. They all meet in one small interface, `Teacher`, so that `label`,
`predict` and `evaluate` never ask what kind of teacher they hold, and teachers of any framework fuse.

Label spaces: each teacher declares its classes by value (``card.label_values``, the integers written in mask
files) and by name (``card.class_names``), or has them declared on its spec (``?labels=0:background,255:lesion``,
``?classes=background,lesion``); `teacher_space` maps them onto one target space (`nakt.labelspace`).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np
import torch

from nakt.errors import NaktError
from nakt.fold import fold_batchnorm
from nakt.inference import infer_probs, resolve_precision
from nakt.io.dataset import Case
from nakt.io.images import Image
from nakt.labelspace import Unified, parse_labels, parse_map, read_label_map, split_label_options, unify
from nakt.models import ModelCard, NaktModel, load, spec_scheme

__all__ = ["NetTeacher", "Teacher", "declare_classes", "fold_pays", "load_teacher",
           "reading_orientation", "runs_own_inference", "teacher_space"]

# teachers that read their label values themselves from ``?labels=`` (as values only)
READS_LABELS = ("masks", "probs", "bundle")


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
    `compile_seconds`: the first batch's time once `nakt.batched.block_probs` compiled the network (else None);
    `compiled_shape`: that batch's input shape while the compiled graph is in use; shorter batches of inputs of its
    size are padded to it (one graph per run)."""

    def __init__(self, spec: str, model: NaktModel, batchnorm_folded: int = 0):
        self.spec, self.model, self.card = spec, model, model.card
        self.orientation = model.card.orientation
        self.batchnorm_folded = batchnorm_folded
        self.compile_seconds: float | None = None
        self.compiled_shape: tuple[int, ...] | None = None

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
    base, label_options = split_label_options(str(spec))
    entry, rest = spec_scheme(base)
    if entry.teacher is None:
        model = load(base)
        folded = fold_batchnorm(model) if fold else 0
        return declare_classes(NetTeacher(str(spec), model.to(device), folded), label_options)
    if trust and entry.name == "nnunet":
        rest += ("&" if "?" in rest else "?") + "trust=1"
    if "labels" in label_options and entry.name in READS_LABELS:
        values = ",".join(str(v) for v in parse_labels(label_options["labels"], str(spec))[0])
        rest += ("&" if "?" in rest else "?") + f"labels={values}"
    return declare_classes(entry.teacher(rest, str(spec), torch.device(device)), label_options)


def declare_classes(teacher: Teacher, label_options: dict[str, str]) -> Teacher:
    """`teacher` with the classes its spec declares: ``labels=VALUE:NAME,...`` (the values of its classes in
    class order, and their names) or ``classes=NAME,...`` (names in class order)."""
    card, spec = teacher.card, teacher.spec
    values, names = list(card.label_values), list(card.class_names)
    if "labels" in label_options:
        given, given_names = parse_labels(label_options["labels"], spec)
        if sorted(given) != sorted(values):
            if len(given) != card.classes:
                raise NaktError(spec, f"?labels= gives {len(given)} classes, the teacher has {card.classes} "
                                f"(values {values})", "give one VALUE:NAME per class, in class order")
            values, names = given, [str(v) for v in given]
        if given_names:
            by_value = dict(zip(given, given_names))
            names = [by_value.get(v, n) for v, n in zip(values, names)]
    if "classes" in label_options:
        names = [n.strip() for n in label_options["classes"].split(",") if n.strip()]
        if len(names) != card.classes:
            raise NaktError(spec, f"?classes= names {len(names)} classes, the teacher has {card.classes}",
                            "name every class, in class order")
    if (values, names) != (list(card.label_values), list(card.class_names)):
        teacher.card = dataclasses.replace(card, label_values=values, class_names=names)
    return teacher


def teacher_space(teachers: list[Teacher], label_map: str | None = None,
                  target: tuple[str, list[int], list[str]] | None = None) -> Unified:
    """The one label space `teachers` are fused in, and each teacher's mapping onto it (`nakt.labelspace.unify`):
    from ``--label-map`` (`label_map`, a YAML file), each spec's ``?map=``, and the teachers' values and names.
    `target`, a space ``(name, values, class names)`` such as a student's, is unified with them, ahead of them
    (its mapping is ``mappings[0]``)."""
    first = teachers[0]
    for other in teachers[1:]:
        if other.card.spatial_dims != first.card.spatial_dims:
            raise NaktError(other.spec, f"is {other.card.spatial_dims}D, {first.spec} is {first.card.spatial_dims}D")
    spaces = [(t.spec, [int(v) for v in t.card.label_values], list(t.card.class_names)) for t in teachers]
    spec_maps = [parse_map(split_label_options(t.spec)[1].get("map", ""), t.spec) for t in teachers]
    if target is not None:
        spaces, spec_maps = [target, *spaces], [{}, *spec_maps]
    return unify(spaces, read_label_map(label_map) if label_map else None, spec_maps)


def fold_pays(precision: str, device: torch.device | str) -> bool:
    """Whether `load_teacher` should fold BatchNorms: only where it is exact, in fp32 (`precision` as given to
    `nakt.inference.resolve_precision`)."""
    return resolve_precision(precision, torch.device(device)) == "fp32"


def runs_own_inference(spec: str) -> bool:
    """Whether `spec` names a teacher that runs its own inference (nnU-Net, bundles, predictions on disk) rather
    than a network nakt feeds (label-space options such as ``?labels=`` aside)."""
    return spec_scheme(split_label_options(str(spec))[0])[0].teacher is not None


def reading_orientation(teachers: list[Teacher]) -> str:
    """The one orientation images are read in for these teachers: the one those that need one share (RAS when
    none needs one). 3D teachers that need different orientations cannot fuse on one grid."""
    needed = {t.spec: t.orientation for t in teachers if t.orientation is not None}
    if teachers[0].card.spatial_dims == 3 and len(set(needed.values())) > 1:
        (a, oa), (b, ob) = list(needed.items())[:2]
        raise NaktError(b, f"reads volumes in orientation {ob}, {a} in {oa}", "fused 3D teachers must share one")
    return next(iter(needed.values()), "RAS")
