"""Online teachers: networks that run on the student's own augmented batch at every step, so that teacher and
student always see the same view (consistent teaching: a flip or rotation never breaks the labels).

Each step draws the supervising teachers (``random``: one, RoS-KD; ``mean``: all of them, fused per sample by
any rule of `nakt.fusion.FUSIONS`). A teacher gets the student's batch in its own terms: its input channels, its
intensity normalisation (z-score and min-max undo the student's and the augmentation's affine intensity changes;
their statistics are taken on the student's grid), its grid; its probabilities come back on the student's grid,
in the student's label order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nakt.classify.roskd import TeacherSampler
from nakt.errors import NaktError
from nakt.fusion import fuse
from nakt.inference import probs_on_grid, probs_to_grid
from nakt.models import ModelCard, NaktModel
from nakt.preprocess import target_size
from nakt.teachers import NetTeacher, load_teacher, runs_own_inference

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
    the student's task, label values, channels and normalisation."""
    for teacher in teachers:
        _check_fits(teacher.spec, teacher.card, student)
    return OnlineTeachers([t.model.to(device).eval() for t in teachers], student, mode, fusion, seed)


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
    if sorted(card.label_values) != sorted(student.label_values):
        raise NaktError(spec, f"label values {sorted(card.label_values)} differ from the student's "
                        f"{sorted(student.label_values)}")
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
    prepared batch `x` ``[B, C_in, *grid]``. `rng` (the draws) belongs in the resume state."""

    def __init__(self, models: Sequence[NaktModel], student: ModelCard, mode: str = "random", fusion: str = "mean",
                 seed: int = 0):
        self.models, self.student, self.fusion = list(models), student, fusion
        self.sampler = TeacherSampler(len(self.models), mode, seed)
        self.rng = self.sampler.rng

    def __len__(self) -> int:
        return len(self.models)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([self._probs(self.models[k], x) for k in self.sampler.draw()])  # [K, B, C, *grid]
        if len(probs) == 1 or self.fusion == "mean":
            return probs.mean(0)
        per_case = probs.transpose(0, 1).cpu().numpy()  # [B, K, C, *grid]
        return torch.stack([torch.from_numpy(fuse(p, self.fusion)) for p in per_case]).float().to(x.device)

    def _probs(self, model: NaktModel, x: torch.Tensor) -> torch.Tensor:
        card = model.card
        if card.task == "classification":
            return model.predict_proba(x).float()
        if card.in_channels != x.shape[1]:  # grey <-> colour, as `nakt.preprocess.adapt_channels`
            x = x[:, :3].mean(1, keepdim=True) if card.in_channels == 1 else x.repeat_interleave(card.in_channels, 1)
        grid = tuple(x.shape[2:])
        x = _resized(_normalized(x, card.normalization), target_size(card, grid))
        probs = probs_to_grid(probs_on_grid(model, x), grid)
        own = [int(v) for v in card.label_values]
        return probs[:, [own.index(int(v)) for v in self.student.label_values]]

