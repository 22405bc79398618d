"""`nakt train` and `nakt finetune`: a model spec (or run) + images + masks or a label set -> run directory."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from nakt.classify.transfer import RECIPES
from nakt.config import at_least, between, check_device, check_options, check_orientation, one_of
from nakt.errors import NaktError
from nakt.fusion import FUSIONS
from nakt.inference import PRECISIONS, pick_device
from nakt.io import outputs, rundir
from nakt.models import parse_spec
from nakt.models.card import HEADS, NORMALIZATIONS, TASKS
from nakt.sharding import current_share, process_group
from nakt.train import classification, segmentation
from nakt.train.classification import train_classifier
from nakt.train.online import check_online_specs
from nakt.train.segmentation import train_segmentation
from nakt.train.setup import RUN_ONLY

__all__ = ["FinetuneOptions", "TASK_OPTIONS", "TrainOptions", "check_task_options", "finetune", "infer_task",
           "resume_options", "train"]

# value checks of TrainOptions (types come from the annotations); run before any data is read
TRAIN_CHECKS = {
    "task": one_of(*TASKS), "head": one_of(*HEADS), "teacher_mode": one_of("random", "mean"),
    "recipe": one_of(*RECIPES), "normalization": one_of(*NORMALIZATIONS), "device": check_device,
    "epochs": at_least(1), "batch_size": at_least(1), "lr": at_least(0, exclusive=True),
    "weight_decay": at_least(0), "temperature": at_least(0, exclusive=True), "alpha": between(0, 1),
    "ema": between(0, 1), "unfreeze_every": at_least(1), "subsets": at_least(0),
    "subset_fraction": between(0, 1, low_open=True), "label_noise": between(0, 1, high_open=True),
    "size": at_least(1), "patch": at_least(1), "patches_per_case": at_least(1), "in_channels": at_least(1),
    "min_confidence": between(0, 1), "val_fraction": between(0, 1, high_open=True),
    "freeze_encoder_epochs": at_least(0), "seed": at_least(0), "orientation": check_orientation,
    "precision": one_of(*PRECISIONS), "num_workers": at_least(0), "cache_gb": at_least(0),
    "fusion": one_of(*FUSIONS), "pixel_weights": one_of(*segmentation.PIXEL_WEIGHTS),
}
# the options only one task takes (each task adapter lists its own); `check_task_options` refuses the others
TASK_OPTIONS = {"segmentation": segmentation.OPTIONS, "classification": classification.OPTIONS}


@dataclass
class TrainOptions:
    """Options of `train` (flag names of ``nakt train``; YAML configs use the same keys).

    `masks` is a masks folder or a label set written by ``nakt label`` (then its soft probabilities are the
    targets unless `hard_labels`). Without validation data, `val_fraction` of the cases is held out.
    With ``task="classification"``, `labels` (a CSV or a classification label set) or class folders under
    `images` give the targets; `head` is softmax, sigmoid (multi-label) or ordinal; `temperature` > 1
    distils a label set's soft probabilities (Hinton KD). Classification extras: `subsets` K trains K teachers
    on overlapping random subsets
    (`subset_fraction` each) into ``out/subset_<k>``, `label_noise` flips that fraction of training labels,
    `balance_classes` draws each epoch's images with probability inversely proportional to their class's
    frequency (imbalanced tasks such as referable DR). Segmentation extras: `patch`, `spatial_augment`,
    `hard_labels`, `orientation`, the mask options and `pixel_weights` (``agreement``: each pixel's loss weighted
    by the share of a label set's teachers agreeing with its fused label; ``confidence``: by the target's top
    probability; ``none``). An option of the other task is refused
    (`check_task_options`).

    Both tasks (one engine, `nakt.train.engine`): `teacher` (networks: run directories, ``torchscript:``,
    ``onnx:``, ``bundle:``) runs online distillation, the teachers seeing the student's own augmented batch at
    every step (`nakt.train.online`): `teacher_mode` ``random`` draws one per step (RoS-KD), ``mean`` runs all
    and fuses them per sample by `fusion` (a `nakt.fusion.FUSIONS` rule); `alpha` weighs the teachers against
    the stored targets (masks, a label set, class labels), which segmentation may leave out (no `masks`: the
    teachers alone teach). `recipe="targeted"` uses discriminative learning rates with
    gradual unfreezing (one more layer group every `unfreeze_every` epochs); `freeze_encoder_epochs` keeps the
    encoder (smp) or everything but the head (classifiers) frozen for the first epochs; `ema` keeps an
    exponential moving average of the weights, which is scored and saved; `min_confidence` leaves pixels
    (segmentation) or images (classification) whose target's top probability is below it out of the loss;
    `precision` is ``auto`` (bf16 on GPUs and on CPUs with AVX512-BF16 or AMX, else fp32), ``fp32``, ``bf16``
    or ``fp16``; `init` starts from another run's weights (every tensor whose name and shape match).
    Training data is read from disk by `num_workers` DataLoader processes (None: none when no training image
    is decoded again every epoch, else half the CPU cores, at most 4; `nakt.train.setup.loader_workers`);
    prepared images up to `cache_gb` GiB are held in memory (validation cases first; None: 0 for segmentation
    with `disk_cache`, else 4). Segmentation writes the other prepared cases once to the run's ``prepared/``
    folder (`disk_cache`, removed when training ends) and reads them back every epoch; without it, and for
    classification, they are decoded and prepared again every epoch. Either way a training set larger than
    memory trains in bounded memory. `compile` runs training steps through
    ``torch.compile``. Under ``torchrun`` the processes train one model with DistributedDataParallel,
    `batch_size` being the global batch.

    `task` is inferred when not given (`infer_task`). 3D volumes are reoriented to `orientation` (a nibabel
    axcode such as ``RAS``, or ``none`` for storage order) before the network sees them; the model card records
    it. `resume` continues an interrupted run in `out` from its last finished epoch (`resume_options`).
    """

    model: str
    images: str
    out: str
    masks: str | None = None
    task: str | None = None
    labels: str | None = None
    val_labels: str | None = None
    label_column: str | None = None
    head: str = "softmax"
    temperature: float = 1.0
    teacher: list[str] | None = None
    teacher_mode: str = "random"
    fusion: str = "mean"
    alpha: float = 0.5
    ema: float | None = None
    recipe: str | None = None
    unfreeze_every: int = 1
    init: str | None = None
    subsets: int = 0
    subset_fraction: float = 0.6
    label_noise: float = 0.0
    balance_classes: bool = False
    val_images: str | None = None
    val_masks: str | None = None
    cases: str | None = None
    val_cases: str | None = None
    channels: list[str] | None = None
    mask_file: str | None = None
    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    size: list[int] | None = None
    patch: list[int] | None = None
    patches_per_case: int = 4
    normalization: str = "zscore"
    in_channels: int | None = None
    label_values: list[int] | None = None
    hard_labels: bool = False
    min_confidence: float = 0.0
    pixel_weights: str = "none"
    augment: bool = True
    spatial_augment: bool = False
    val_fraction: float = 0.2
    freeze_encoder_epochs: int = 0
    pretrained: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    seed: int = 0
    orientation: str = "RAS"
    precision: str = "auto"
    num_workers: int | None = None
    cache_gb: float | None = None
    disk_cache: bool = True
    compile: bool = False
    device: str = "auto"
    overwrite: bool = False
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_options(self, TRAIN_CHECKS)
        if self.size is not None and len(self.size) not in (1, 2, 3):
            raise NaktError(None, f"--size takes 1, 2 or 3 numbers, got {len(self.size)}")
        if self.patch is not None and len(self.patch) not in (1, 2, 3):
            raise NaktError(None, f"--patch takes 1, 2 or 3 numbers, got {len(self.patch)}")
        if self.resume and self.overwrite:
            raise NaktError(None, "--resume continues a run, --overwrite replaces it", "give one of them")
        alone = [f for f, default in (("alpha", 0.5), ("teacher_mode", "random"), ("fusion", "mean"))
                 if getattr(self, f) != default and not self.teacher]
        if alone:
            raise NaktError(None, f"--{alone[0].replace('_', '-')} weighs online teachers, and none is given",
                            "add --teacher, or drop it")
        if self.recipe == "targeted" and self.freeze_encoder_epochs:
            raise NaktError(None, "--freeze-encoder-epochs does not combine with --recipe targeted, whose gradual "
                            "unfreezing decides what trains", "drop one of them")


@dataclass
class FinetuneOptions(TrainOptions):
    """`train` defaults for a small labelled set: a lower LR and the encoder frozen for the first 5 epochs
    (none with ``recipe="targeted"``, which unfreezes gradually by itself)."""

    epochs: int = 20
    lr: float = 1e-4
    freeze_encoder_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.freeze_encoder_epochs is None:
            self.freeze_encoder_epochs = 0 if self.recipe == "targeted" else 5
        super().__post_init__()


def infer_task(opts: TrainOptions) -> str:
    """The task when `--task` is not given: a run's own, classification for classifier specs (``timm:``,
    ``torchvision:``) or `labels` without `masks`, else segmentation. A given task that contradicts the spec
    or the run is an error."""
    scheme, rest = parse_spec(opts.model)
    implied = None
    if scheme == "run":
        implied = rundir.read_config(Path(rest))[0].task
    elif scheme in ("timm", "torchvision"):
        implied = "classification"
    elif scheme in ("smp", "monai"):
        implied = "segmentation"
    if opts.task is not None and implied is not None and opts.task != implied:
        raise NaktError(opts.model, f"is a {implied} model, not {opts.task}", f"use --task {implied} or drop --task")
    if opts.task is not None:
        return opts.task
    if implied is not None:
        return implied
    return "classification" if opts.labels is not None and opts.masks is None else "segmentation"




def resume_options(out: str | Path, given: dict, cls: type[TrainOptions] = TrainOptions) -> TrainOptions:
    """Options of the unfinished run in `out`, read back from its config.json, for ``--resume``.

    `given` may repeat the original options (``nakt train <same flags> --resume``) or hold only ``out``; a value
    that differs from the recorded one is refused, since the run could not end as an uninterrupted one would.
    """
    out = Path(out)
    if outputs.holds_output(out, outputs.SUBSET_RUNS):  # RoS-KD subset teachers: the record is the parent's
        record = rundir.read_json(out / outputs.SUBSET_RUNS.marker).get("training", {})
    elif outputs.holds_output(out, outputs.RUN):
        _, record = rundir.read_config(out, require_complete=False)
        if rundir.is_complete(out):
            raise NaktError(out, "training finished already: nothing to resume", "use it, or --overwrite to retrain")
    else:
        raise NaktError(out, "is not a run directory: nothing to resume", "start it with nakt train (no --resume)")
    names = {f.name for f in fields(cls)}
    recorded = {k: v for k, v in record.items() if k in names and k not in RUN_ONLY}
    for key, value in given.items():
        if value is None or key in RUN_ONLY or key not in recorded or key == "out":
            continue
        if _normal(value) != _normal(recorded[key]):
            raise NaktError(out, f"--{key.replace('_', '-')} {value!r} differs from the interrupted run's "
                            f"{recorded[key]!r}", "resume with the original options (or only --out and --resume)")
    extra = {k: v for k, v in given.items() if k in RUN_ONLY and v is not None}
    return cls(**{**recorded, **extra, "out": str(out), "resume": True})


def _normal(value):
    """Compare option values as they are recorded in JSON (paths as strings, tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def check_task_options(opts: TrainOptions) -> None:
    """Refuse an option of another task than `opts.task` given a value other than its default: silently ignoring
    it would hide a wrong ``--task`` (each adapter lists its own, e.g. `nakt.train.segmentation.OPTIONS`)."""
    defaults = {f.name: f.default for f in fields(type(opts))}
    for task, names in TASK_OPTIONS.items():
        given = [name for name in names if task != opts.task and getattr(opts, name) != defaults[name]]
        if given:
            raise NaktError(None, f"--{given[0].replace('_', '-')} applies to {task} only",
                            f"add --task {task} or drop it")


def train(opts: TrainOptions) -> Path:
    """Train a model spec (or continue a run) and write a run directory; returns its path.

    config.json is written first and marked complete only when training ends; until then `nakt.load` refuses
    the run and ``resume=True`` continues it from its last finished epoch.
    """
    opts.task = infer_task(opts)
    check_task_options(opts)
    if opts.init is not None:
        rundir.read_config(Path(opts.init))  # an unfinished or foreign --init fails now, with its reason
    if opts.teacher:
        check_online_specs(opts.teacher)
    share = current_share()
    if share.distributed and opts.subsets:
        raise NaktError(None, "--subsets under torchrun", "train the subset teachers as one job each, or in "
                        "one process")
    backend = "nccl" if share.device(pick_device(opts.device)).type == "cuda" else "gloo"
    with process_group(share, backend):
        return (train_classifier if opts.task == "classification" else train_segmentation)(opts)


def finetune(opts: FinetuneOptions) -> Path:
    """Continue training a run directory on a (small) labelled set; writes a new run directory."""
    if parse_spec(opts.model)[0] != "run":
        raise NaktError(opts.model, "finetune continues a run directory", "train a model with nakt train first")
    return train(opts)
