"""`ModelCard`: everything needed to rebuild a model and feed it (the run directory's config.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from nakt.errors import NaktError
from nakt.io.images import orientation_code

__all__ = ["HEADS", "NORMALIZATIONS", "TASKS", "ModelCard"]

TASKS = ("segmentation", "classification")  # what a model does; every verb takes --task from these
NORMALIZATIONS = ("zscore", "minmax", "none")
HEADS = ("softmax", "sigmoid", "ordinal")


@dataclass
class ModelCard:
    """A model's input/output contract.

    `head` is ``softmax`` (one class per image or pixel), ``sigmoid`` (multi-label classification) or
    ``ordinal`` (graded classes; the network emits C-1 cumulative logits). `class_names` name the classes.
    `label_values` maps class index -> the integer written in mask files (e.g. ``[0, 255]``), so labels are
    written back with the values the training masks used. `size` resizes inputs (2D or 3D) before the
    network; `patch` trains on random patches and infers with sliding windows. `normalization` is per image
    and per channel: ``zscore`` (mean 0, std 1), ``minmax`` (to [0, 1]) or ``none``. `orientation` is the axis
    code 3D volumes are reoriented to before the network (``RAS``, ``LPS``...; ``none``: storage order, see
    `nakt.io.images`); 2D models ignore it.
    """

    spec: str
    in_channels: int
    classes: int
    spatial_dims: int = 2
    task: str = "segmentation"
    label_values: list[int] = field(default_factory=list)
    size: list[int] | None = None
    patch: list[int] | None = None
    normalization: str = "zscore"
    output: str = "logits"
    size_divisor: int = 1
    model_kwargs: dict = field(default_factory=dict)
    head: str = "softmax"
    class_names: list[str] = field(default_factory=list)
    orientation: str = "RAS"

    def __post_init__(self) -> None:
        self.orientation = orientation_code(self.orientation)
        if self.task not in TASKS:
            raise NaktError(None, f"unknown task {self.task!r}", f"valid: {', '.join(TASKS)}")
        if self.head not in HEADS:
            raise NaktError(None, f"unknown head {self.head!r}", f"valid: {', '.join(HEADS)}")
        if not self.class_names:
            self.class_names = [str(v) for v in (self.label_values or range(self.classes))]
        if not self.label_values:
            self.label_values = list(range(self.classes))
        if len(self.label_values) != self.classes:
            raise NaktError(None, f"{len(self.label_values)} label values for {self.classes} classes")
        if self.normalization not in NORMALIZATIONS:
            raise NaktError(None, f"unknown normalization {self.normalization!r}", f"valid: {NORMALIZATIONS}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None, hint: str = "written by nakt train?") -> ModelCard:
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("spec", "in_channels", "classes") if k not in data]
        if missing:
            raise NaktError(source, f"missing key {missing[0]!r}", hint)
        # A 3D run written before volumes were reoriented saw storage order (NIfTI's i, j, k, but z, y, x for
        # MHA/NRRD/DICOM); defaulting it to RAS would feed it transposed volumes without a word.
        legacy_run = str(data.get("format", "")).startswith("nakt.run/") and "orientation" not in data
        if legacy_run and data.get("spatial_dims") == 3:
            raise NaktError(source, "this 3D run predates nakt's axis convention (volumes are now reoriented, "
                            "RAS by default), so it would see them transposed",
                            'trained on NIfTI volumes: add "orientation": "none" to its config.json; '
                            "trained on MHA/NRRD/DICOM: retrain it")
        return cls(**{k: v for k, v in data.items() if k in known})
