"""`nakt train` and `nakt finetune`: a model spec (or run) + images + masks or a label set -> run directory."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from nakt.classify.transfer import RECIPES
from nakt.config import at_least, between, check_device, check_options, check_orientation, option
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

TEACHER_MODES = ("random", "mean")
# value checks of TrainOptions beyond their types (annotations) and choices (`option`); run before any data is read
TRAIN_CHECKS = {
    "device": check_device, "epochs": at_least(1), "batch_size": at_least(1), "lr": at_least(0, exclusive=True),
    "weight_decay": at_least(0), "temperature": at_least(0, exclusive=True), "alpha": between(0, 1),
    "ema": between(0, 1), "unfreeze_every": at_least(1), "subsets": at_least(0),
    "subset_fraction": between(0, 1, low_open=True), "label_noise": between(0, 1, high_open=True),
    "size": at_least(1), "patch": at_least(1), "patches_per_case": at_least(1), "in_channels": at_least(1),
    "min_confidence": between(0, 1), "val_fraction": between(0, 1, high_open=True),
    "freeze_encoder_epochs": at_least(0), "seed": at_least(0), "orientation": check_orientation,
    "num_workers": at_least(0), "cache_gb": at_least(0), "labelled_ratio": between(0, 1, low_open=True, high_open=True),
}
# the options only one task takes (each task adapter lists its own); `check_task_options` refuses the others
TASK_OPTIONS = {"segmentation": segmentation.OPTIONS, "classification": classification.OPTIONS}


@dataclass
class TrainOptions:
    """Options of `train` (flag names of ``nakt train``; YAML configs use the same keys; each field's help is
    its ``--help`` line).

    `masks` is a masks folder or a label set written by ``nakt label`` (then its soft probabilities are the
    targets unless `hard_labels`). With ``task="classification"``, `labels` (a CSV or a classification label set)
    or class folders under `images` give the targets. `subsets` K trains K teachers on overlapping random subsets
    into ``out/subset_<k>``. An option of the other task is refused (`check_task_options`).

    Both tasks (one engine, `nakt.train.engine`): `teacher` runs online distillation, the teachers seeing the
    student's own augmented batch at every step (`nakt.train.online`); `teacher_mode` ``mean`` fuses them per
    sample by a `nakt.fusion.FUSIONS` rule. Segmentation may leave out `masks` (the teachers alone teach).
    Training data is read from disk by `num_workers` DataLoader processes (None: `nakt.train.setup.loader_workers`);
    prepared images up to `cache_gb` GiB are held in memory (validation cases first). Segmentation writes the
    other prepared cases once to the run's ``prepared/`` folder (`disk_cache`) and reads them back every epoch;
    without it, and for classification, they are decoded and prepared again every epoch. Either way a training
    set larger than memory trains in bounded memory. Under ``torchrun`` the processes train one model with
    DistributedDataParallel, `batch_size` being the global batch.

    `task` is inferred when not given (`infer_task`); the model card records `orientation`. `resume` continues an
    interrupted run in `out` from its last finished epoch (`resume_options`).
    """

    model: str = option(help="model spec: smp:Unet/resnet18, monai:UNet, ... (or a run directory to continue)",
                        group="model")
    images: str = option(help="folder of images (files, or one folder per case)", group="data")
    out: str = option(help="run directory to write", group="output")
    masks: str | None = option(None, "folder of masks paired by case name, or a label set written by nakt label",
                               group="data")
    task: str | None = option(None, "default: the model's, or inferred from the targets", group="model",
                              choices=TASKS)
    labels: str | None = option(None, "CSV (image,label or one 0/1 column per finding) or a label set; default: "
                                "class folders under --images", group="classification")
    val_labels: str | None = option(None, "labels of --val-images", group="classification")
    label_column: str | None = option(None, "the CSV column holding the class (default: label)",
                                      group="classification")
    head: str = option("softmax", "softmax, sigmoid (multi-label) or ordinal (graded classes)",
                       group="classification", choices=HEADS)
    temperature: float = option(1.0, "distillation temperature for a label set's soft labels (Hinton KD)",
                                group="classification")
    teacher: list[str] | None = option(None, "online distillation from this network (run directory, torchscript:, "
                                       "onnx:, bundle:), run on the student's augmented batches (repeat for "
                                       "several)", group="teachers", repeat=True)
    teacher_mode: str = option("random", "random: one teacher per step (RoS-KD); mean: all, fused by --fusion",
                               group="teachers", choices=TEACHER_MODES)
    fusion: str = option("mean", "how online teachers are fused per sample with --teacher-mode mean",
                         group="teachers", choices=FUSIONS)
    alpha: float = option(0.5, "weight of the teachers against the stored targets", group="teachers")
    ema: float | None = option(None, "keep an exponential moving average of the weights (e.g. 0.999), which is "
                               "scored and saved", group="schedule")
    recipe: str | None = option(None, "targeted: discriminative LRs + gradual unfreezing", group="schedule",
                                choices=RECIPES)
    unfreeze_every: int = option(1, "targeted recipe: epochs between unfreezing steps", group="schedule")
    init: str | None = option(None, "start from the weights of another run (every tensor whose name and shape "
                              "match)", group="model")
    subsets: int = option(0, "RoS-KD: train K teachers on overlapping random subsets", group="classification")
    subset_fraction: float = option(0.6, "fraction of the data in each subset", group="classification")
    label_noise: float = option(0.0, "flip this fraction of training labels (experiments)", group="classification")
    balance_classes: bool = option(False, "sample each class equally often per epoch (imbalanced tasks)",
                                   group="classification")
    labelled_images: str | None = option(None, "images with true masks trained beside the label set in --masks, "
                                         "in every batch (semi-supervised)", group="data")
    labelled_masks: str | None = option(None, "the true masks of --labelled-images", group="data")
    labelled_cases: str | None = option(None, "case list of --labelled-images (as --cases)", group="data")
    labelled_ratio: float = option(0.5, "share of each batch drawn from --labelled-images", group="data")
    val_images: str | None = option(None, "validation images (default: hold out --val-fraction of the cases)",
                                    group="data")
    val_masks: str | None = option(None, "validation masks (default: the --masks folder)", group="data")
    cases: str | None = None
    val_cases: str | None = option(None, "validation case list", group="data")
    channels: list[str] | None = None
    mask_file: str | None = None
    epochs: int = option(50, "epochs to train", group="schedule")
    batch_size: int = option(8, "images (or patches) per step; under torchrun the global batch", group="schedule")
    lr: float = option(1e-3, "peak learning rate of the one-cycle schedule", group="schedule")
    weight_decay: float = option(1e-4, "the optimiser's weight decay", group="schedule")
    size: list[int] | None = option(None, "resize to this size before the network (128 or 256 192)", group="model")
    patch: list[int] | None = option(None, "train on patches, infer with sliding windows (96 96 64)",
                                     group="segmentation")
    patches_per_case: int = option(4, "--patch crops drawn from each case per epoch (without --patch: one whole "
                                   "image per case)", group="segmentation")
    normalization: str = option("zscore", "per image and channel: zscore, minmax (to [0, 1]) or none",
                                group="model", choices=NORMALIZATIONS)
    in_channels: int | None = option(None, "network input channels (default: the images'; grey<->RGB is "
                                     "converted)", group="model")
    label_values: list[int] | None = option(None, "all label values the model predicts (default: those found in "
                                            "the masks)", group="segmentation")
    hard_labels: bool = option(False, "with a label set as --masks: train on its hard masks, not its soft "
                               "probabilities", group="segmentation")
    min_confidence: float = option(0.0, "with soft labels: leave pixels (classification: images) whose top "
                                   "probability is below this out of the loss", group="teachers")
    pixel_weights: str = option("none", "weigh each pixel's loss by the label set's teacher agreement there, or by "
                                "the target's confidence", group="segmentation", choices=segmentation.PIXEL_WEIGHTS)
    batch_dice: bool = option(False, "compute the Dice loss per class over the whole batch, not per image "
                              "(nnU-Net's batch Dice): small or rare classes, absent from most images, are then "
                              "not pushed towards never being predicted", group="segmentation")
    val_metric: str = option("dice", "how validation scores an epoch: dice (each case's foreground Dice, "
                             "averaged over cases) or pooled (each class's Dice over all validation pixels, "
                             "averaged over classes: nnU-Net's pseudo-Dice; a rare class absent from most cases "
                             "counts fully)", group="segmentation", choices=segmentation.VAL_METRICS)
    annotated_classes: str | None = option(None, "CSV case,classes: the classes each listed case's mask "
                                           "annotates (values or names; the others lie in it as background), "
                                           "learnt with the marginal loss; unlisted cases: all",
                                           group="segmentation")
    augment: bool = option(True, "no flips or intensity jitter of the training images", group="schedule")
    spatial_augment: bool = option(False, "also rotate (up to 15 degrees) and scale (0.85-1.15) images with their "
                                   "targets", group="segmentation")
    val_fraction: float = option(0.2, "cases held out for validation without --val-images (0: none; the last "
                                 "epoch is kept)", group="data")
    freeze_encoder_epochs: int = option(0, "keep the encoder (classifiers: all but the head) frozen for this many "
                                        "epochs (finetune: 5, none with --recipe targeted)", group="schedule")
    pretrained: str | None = option(None, "local weights file for the encoder (never downloaded)", group="model")
    model_kwargs: dict = option(default_factory=dict, cli=False)
    seed: int = option(0, "seed of the split, sampling and initialisation", group="schedule")
    orientation: str = option("RAS", "3D: reorient volumes to this anatomical orientation before the network (a "
                              "nibabel axcode such as RAS or LPS; none keeps storage order)", group="segmentation")
    precision: str = option("auto", "training arithmetic (autocast): auto is bf16 on GPUs (fp16 before "
                            "Ampere) and on CPUs with AVX512-BF16 or AMX, else fp32", group="performance",
                            choices=PRECISIONS)
    num_workers: int | None = option(None, "DataLoader processes reading and augmenting training images (default: "
                                     "none when every image fits the cache, else half the CPU cores up to 4)",
                                     group="performance")
    cache_gb: float | None = option(None, "hold prepared images in memory up to this many GiB (validation first; "
                                    "default: 0 for segmentation, which keeps them in RUN/prepared/, else 4)",
                                    group="performance")
    disk_cache: bool = option(True, "segmentation: decode and prepare images beyond --cache-gb every epoch instead "
                              "of writing them once to RUN/prepared/ (removed when training ends)",
                              group="performance")
    compile: bool = option(False, "run training steps through torch.compile (Inductor; the first steps take "
                           "longer)", group="performance")
    device: str = "auto"
    overwrite: bool = option(False, "replace a run directory of nakt's own (never a folder nakt did not write)",
                             group="output")
    resume: bool = option(False, "continue the interrupted run in --out from its last finished epoch (its options "
                          "are read back from its config.json)", group="output")
    progress: bool = True

    def __post_init__(self) -> None:
        check_options(self, TRAIN_CHECKS)
        if self.size is not None and len(self.size) not in (1, 2, 3):
            raise NaktError(None, f"--size takes 1, 2 or 3 numbers, got {len(self.size)}")
        if self.patch is not None and len(self.patch) not in (1, 2, 3):
            raise NaktError(None, f"--patch takes 1, 2 or 3 numbers, got {len(self.patch)}")
        if self.resume and self.overwrite:
            raise NaktError(None, "--resume continues a run, --overwrite replaces it", "give one of them")
        if self.labelled_ratio != 0.5 and self.labelled_images is None:
            raise NaktError(None, "--labelled-ratio shares batches with --labelled-images, and none is given",
                            "add --labelled-images and --labelled-masks, or drop it")
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
    device = share.device(pick_device(opts.device))
    with process_group(share, "nccl" if device.type == "cuda" else "gloo", device):
        return (train_classifier if opts.task == "classification" else train_segmentation)(opts)


def finetune(opts: FinetuneOptions) -> Path:
    """Continue training a run directory on a (small) labelled set; writes a new run directory."""
    if parse_spec(opts.model)[0] != "run":
        raise NaktError(opts.model, "finetune continues a run directory", "train a model with nakt train first")
    return train(opts)
