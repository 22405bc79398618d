"""Online teachers: networks that run on the student's own augmented batch at every step, so that teacher and
student always see the same view (consistent teaching: a flip or rotation never breaks the labels).

Each step draws the supervising teachers (``random``: one, RoS-KD; ``mean``: all of them, fused per sample by
any rule of `nakt.fusion.FUSIONS`). Teachers may speak other label languages than the student (values, names,
``?map=``: `nakt.labelspace.unify`); teachers that know only some of the student's classes are fused per class
over those that know it (`nakt.fusion.fuse_partial`), which needs them all at every step (``mean``).

A teacher gets the student's batch in its own terms: its input channels, its intensity normalisation (z-score
and min-max undo the student's and the augmentation's affine intensity changes; their statistics are taken on
the student's grid), its grid; its probabilities come back on the student's grid, in the student's classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from nakt.classify.roskd import TeacherSampler
from nakt.errors import NaktError
from nakt.fusion import fuse, fuse_partial
from nakt.inference import probs_on_grid, probs_to_grid
from nakt.models import ModelCard, NaktModel
from nakt.preprocess import target_size
from nakt.teachers import NetTeacher, load_teacher, runs_own_inference, teacher_space

__all__ = ["OnlineTeachers", "check_online_specs", "load_net_teachers", "load_online_teachers", "online_teachers"]


def check_online_specs(specs: Sequence[str]) -> None:
    """Refuse, before any data is read, teachers that cannot run on an augmented batch: predictions on disk
    (``masks:``, ``probs:``) and nnU-Net folders (nnU-Net's predictor reads files)."""
    for spec in specs:
        if runs_own_inference(spec):
            raise NaktError(spec, "cannot run on the student's augmented batches (not a network nakt runs)",
                            "label the images with it (nakt label) and train on the label set, or mix: --masks "
                            "LABELSET with --teacher")


def load_online_teachers(specs: Sequence[str], student: ModelCard, device: torch.device, mode: str = "random",
                         fusion: str = "mean", seed: int = 0, trust: bool = False) -> OnlineTeachers:
    """Teachers from specs `nakt label` accepts that are networks nakt runs itself (run directories,
    ``torchscript:``, ``onnx:``, ``bundle:``); predictions on disk and nnU-Net folders cannot see an augmented
    batch, and are refused with one line."""
    return online_teachers(load_net_teachers(specs, trust=trust), student, device, mode, fusion, seed)


def load_net_teachers(specs: Sequence[str], trust: bool = False) -> list[NetTeacher]:
    """The networks of `specs`, on the CPU until `online_teachers` moves them (loaded once: a student without
    masks reads their label values first), refusing teachers that cannot run online (`check_online_specs`)."""
    check_online_specs(specs)
    return [load_teacher(spec, "cpu", trust) for spec in specs]


def online_teachers(teachers: Sequence[NetTeacher], student: ModelCard, device: torch.device, mode: str = "random",
                    fusion: str = "mean", seed: int = 0) -> OnlineTeachers:
    """Loaded networks (`load_net_teachers`) as the student's online teachers on `device`, each checked to fit
    the student's task, channels and normalisation, its classes mapped onto the student's (`student_classes`)."""
    for teacher in teachers:
        _check_fits(teacher.spec, teacher.card, student)
    targets = student_classes(teachers, student) if student.task == "segmentation" else None
    online = OnlineTeachers([t.model.to(device).eval() for t in teachers], student, mode, fusion, seed, targets)
    if online.known is not None and mode == "random":
        for teacher, known in zip(teachers, online.known):
            if not known.all():
                raise NaktError(teacher.spec, f"knows {int(known.sum())} of the student's {student.classes} "
                                "classes: alone at a step it would teach the others as absent",
                                "use --teacher-mode mean (every teacher at every step, fused per class over the "
                                "teachers that know it)")
    return online


def student_classes(teachers: Sequence[NetTeacher], student: ModelCard) -> list[list[int]]:
    """For each teacher, the student's class index of each of its own classes: the student's and the teachers'
    label spaces unified by value, name or ``?map=`` as `nakt label` does (`nakt.teachers.teacher_space`). A teacher
    class the student does not predict is refused in one line."""
    unified = teacher_space(list(teachers), target=("the student", [int(v) for v in student.label_values],
                                                    list(student.class_names)))
    own = unified.mappings[0].target_index  # the student's class i -> unified class own[i]
    to_student = {target: i for i, target in enumerate(own)}
    for teacher, mapping in zip(teachers, unified.mappings[1:]):
        missing = [v for v, target in zip(mapping.own_values, mapping.target_index) if target not in to_student]
        if missing:
            raise NaktError(teacher.spec, f"predicts label values {missing} the student does not (its label values: "
                            f"{student.label_values})", "name or map its classes onto the student's (?labels="
                            "VALUE:NAME, ?map=FROM:TO), or train the student on these teachers' label set")
    return [[to_student[target] for target in m.target_index] for m in unified.mappings[1:]]


def _check_fits(spec: str, card: ModelCard, student: ModelCard) -> None:
    if card.task != student.task or card.spatial_dims != student.spatial_dims:
        raise NaktError(spec, f"is a {card.spatial_dims}D {card.task} model, the student a {student.spatial_dims}D "
                        f"{student.task} one")
    if student.task == "classification":
        if card.class_names != student.class_names or card.size != student.size:
            raise NaktError(spec, f"teacher classes {card.class_names} / size {card.size} differ from the "
                            f"student's {student.class_names} / {student.size}", "online teachers see the student's "
                            "batch")
        return
    if card.normalization == "none" and student.normalization != "none":
        raise NaktError(spec, "takes unnormalised intensities, the student's batches are normalised",
                        "train the student with --normalization none")
    if card.in_channels != student.in_channels and 1 not in (card.in_channels, student.in_channels):
        raise NaktError(spec, f"takes {card.in_channels} channels, the student's images have {student.in_channels}")


def _normalized(x: torch.Tensor, method: str) -> torch.Tensor:
    """`nakt.preprocess.normalize` per sample and channel, on a batch ``[B, C, *grid]``."""
    if method == "none":
        return x
    axes = tuple(range(2, x.ndim))
    if method == "zscore":
        return (x - x.mean(axes, keepdim=True)) / x.std(axes, keepdim=True, correction=0).clamp_min(1e-6)
    lo, hi = x.amin(axes, keepdim=True), x.amax(axes, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6)


def _resized(x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(grid):
        return x
    mode = "bilinear" if len(grid) == 2 else "trilinear"
    return torch.nn.functional.interpolate(x, size=grid, mode=mode, align_corners=False)


class OnlineTeachers:
    """``teachers(x)``: the drawn teachers' fused probabilities ``[B, C, *grid]`` (float32) for the student's
    prepared batch `x` ``[B, C_in, *grid]``. `rng` (the draws) belongs in the resume state.

    `targets` (segmentation): for each model, the student's class index of each of its classes
    (`student_classes`); by default its label values' places among the student's. Where some model knows only
    some classes, each sample is fused by `fuse_partial`."""

    def __init__(self, models: Sequence[NaktModel], student: ModelCard, mode: str = "random", fusion: str = "mean",
                 seed: int = 0, targets: Sequence[Sequence[int]] | None = None):
        self.models, self.student, self.fusion = list(models), student, fusion
        self.sampler = TeacherSampler(len(self.models), mode, seed)
        self.rng = self.sampler.rng
        if student.task == "classification":
            self.targets, self.known = None, None
            return
        values = [int(v) for v in student.label_values]
        self.targets = [list(t) for t in targets] if targets is not None else [
            [values.index(int(v)) for v in m.card.label_values] for m in self.models]
        self.known = np.zeros((len(self.models), len(values)), dtype=bool)  # [K, C]: model k knows class c
        for k, target in enumerate(self.targets):
            self.known[k, target] = True

    def __len__(self) -> int:
        return len(self.models)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        drawn = list(self.sampler.draw())
        probs = torch.stack([self._probs(k, x) for k in drawn])  # [K, B, C, *grid]
        partial = self.known is not None and not self.known[drawn].all()
        if not partial and (len(probs) == 1 or self.fusion == "mean"):
            return probs.mean(0)
        per_case = probs.transpose(0, 1).float().cpu().numpy()  # [B, K, C, *grid]
        fused = [fuse_partial(p, self.known[drawn], self.fusion)[0] if partial else fuse(p, self.fusion)
                 for p in per_case]
        return torch.stack([torch.from_numpy(f) for f in fused]).float().to(x.device)

    def _probs(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Model k's probabilities of the student's batch, in the student's classes ``[B, C, *grid]`` (zeros for
        the classes it does not know; two of its classes on one of the student's add up)."""
        model = self.models[k]
        card = model.card
        if card.task == "classification":
            return model.predict_proba(x).float()
        if card.in_channels != x.shape[1]:  # grey <-> colour, as `nakt.preprocess.adapt_channels`
            x = x[:, :3].mean(1, keepdim=True) if card.in_channels == 1 else x.repeat_interleave(card.in_channels, 1)
        grid = tuple(x.shape[2:])
        x = _resized(_normalized(x, card.normalization), target_size(card, grid))
        probs = probs_to_grid(probs_on_grid(model, x), grid)
        target = self.targets[k]
        if target == list(range(self.student.classes)):
            return probs
        out = probs.new_zeros((probs.shape[0], self.student.classes, *probs.shape[2:]))
        return out.index_add_(1, torch.tensor(target, device=probs.device), probs)

