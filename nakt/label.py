"""`nakt label`: teachers annotate a transferal set; their probabilities are fused into a label set.

Each teacher brings its own preprocessing (size, patching, normalisation, channels) from its model card;
every teacher's probabilities are mapped back to the image's own grid before fusion, so teachers with
different inputs can be combined. Cases already in the label set are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nakt.batched import (
    INFERENCE_CHECKS,
    BackgroundWriter,
    InferenceOptions,
    block_probs,
    blocks,
    default_batch_size,
    load_blocks,
)
from nakt.classify.stages import label_classification
from nakt.config import at_least, between, check_device, check_options, option
from nakt.errors import NaktError, look_up_option
from nakt.fusion import (
    FUSIONS,
    agreement_map,
    default_fusion,
    fuse,
    fuse_partial,
    hard_labels,
    sharpen,
    staple_estimates,
    staple_weights,
    teacher_agreement,
    trimmed_vote,
)
from nakt.inference import infer_probs, pick_device, resolve_layout, resolve_precision
from nakt.io import labelset, outputs, rundir
from nakt.io.dataset import discover_cases
from nakt.io.images import write_label
from nakt.labelspace import Unified, base_spec
from nakt.machine import this_machine
from nakt.models import NaktModel, load, parse_spec
from nakt.models.card import TASKS
from nakt.preprocess import decode_labels
from nakt.sharding import Share, current_share, on_first_part, process_group
from nakt.teachers import NetTeacher, fold_pays, load_teacher, reading_orientation, runs_own_inference, teacher_space
from nakt.version import __version__

__all__ = ["LabelOptions", "fuse_probs", "label", "label_arrays", "model_task", "teacher_weights"]

WEIGHTINGS = ("dice", "inverse-error")


@dataclass
class LabelOptions(InferenceOptions):
    """Options of `label` (flag names of ``nakt label``). `task` defaults to the teachers' own. An existing label
    set of the same teachers and fusion in `out` is resumed; `overwrite` replaces it instead."""

    teacher: list[str] = option(help="run directory, torchscript:FILE, onnx:FILE, nnunet:DIR, bundle:DIR, "
                                "masks:DIR or probs:DIR (repeat for several); any of them takes "
                                "?labels=0:background,255:lesion (its classes' values and names), "
                                "?classes=NAME,... or ?map=1:255", group="teachers", repeat=True)
    images: str = option(help="folder of images (files, or one folder per case)", group="data")
    out: str = option(help="label-set folder (masks/, probs/, manifest.json)", group="output")
    fusion: str | None = option(None, "mean, weighted (validation Dice), vote, staple, staple-weighted (mean "
                                "weighted by STAPLE's label-free quality estimates), confidence (per-pixel weights "
                                "from each teacher's entropy), trimmed-vote (vote of the teachers left after "
                                "dropping the one that agrees least with the others, per case); default vote for "
                                "2+ segmentation teachers, else mean", group="teachers", choices=FUSIONS)
    sharpen: float = option(1.0, "temperature of the fused soft labels: p^(1/T) renormalised (T < 1 sharpens)",
                            group="teachers")
    task: str | None = option(None, "default: the teachers' own", group="model", choices=TASKS)
    weights: list[float] | None = option(None, "teacher weights for --fusion weighted", group="teachers")
    weighting: str = option("dice", "weights from validation Dice: the Dice itself or 1 / (1 - Dice)",
                            group="teachers", choices=WEIGHTINGS)
    label_map: str | None = option(None, "YAML file mapping the teachers' classes onto one target space "
                                   "(classes:, map:, teachers:; README: teachers with different label spaces); "
                                   "by default teachers fuse when their values agree, by name when all name their "
                                   "classes, or when each has one foreground", group="teachers")
    cases: str | None = None
    channels: list[str] | None = None
    save_teacher_probs: bool = option(False, "keep every teacher's probabilities in the label set (for nakt "
                                      "report's per-teacher outlines)", group="output")
    trust_checkpoint: bool = False
    device: str = "auto"
    overwrite: bool = option(False, "replace a label set of nakt's own instead of resuming it", group="output")
    progress: bool = True
    num_parts: int = option(1, "split the cases into this many parts, each labelled by its own process into the "
                            "same --out (SLURM arrays; torchrun splits by itself)", group="performance")
    part_id: int = option(0, "the part this process labels, 0 .. num-parts - 1", group="performance")

    def __post_init__(self) -> None:
        check_options(self, {"weights": at_least(0), "device": check_device,
                             "num_parts": at_least(1), "part_id": between(0, self.num_parts, high_open=True),
                             "sharpen": at_least(0, exclusive=True),
                             **INFERENCE_CHECKS})
        if self.num_parts > 1 and self.overwrite:
            raise NaktError(None, "--overwrite with --num-parts would let each part remove the others' cases",
                            "empty the --out folder once before starting the parts")
        if not self.teacher:
            raise NaktError(None, "no teacher given", "pass --teacher RUN_DIR (repeatable)")
        if self.weights is not None:
            if len(self.weights) != len(self.teacher):
                raise NaktError(None, f"--weights: {len(self.weights)} weights for {len(self.teacher)} teachers")
            if sum(self.weights) <= 0:
                raise NaktError(None, "--weights: at least one teacher needs a positive weight")


def _checksum(spec: str) -> str:
    """SHA-256 of a teacher's weights file, or of a folder teacher's file listing (`outputs.checksum`)."""
    scheme, rest = parse_spec(base_spec(spec))
    return outputs.checksum(Path(rest) / rundir.WEIGHTS if scheme == "run" else Path(rest.split("?")[0]))


def model_task(spec: str) -> str:
    """The task of a trained model: a run directory's card, a network file's contract; teachers that are not
    networks nakt feeds (nnU-Net, bundles, predictions on disk) segment."""
    spec = base_spec(spec)
    scheme, rest = parse_spec(spec)
    if scheme == "run":
        return rundir.read_config(Path(rest))[0].task
    return "segmentation" if runs_own_inference(spec) else load(spec).card.task


def check_task(opts) -> str:
    """`opts.task`, or the task of the teachers (`opts.teacher`) / model (`opts.model`) when not given; every
    model must be of that task."""
    specs = opts.teacher if hasattr(opts, "teacher") else [opts.model]
    tasks = [model_task(str(spec)) for spec in specs]
    task = opts.task or tasks[0]
    for spec, own in zip(specs, tasks):
        if own != task:
            raise NaktError(spec, f"is a {own} model, not {task}", f"use --task {own}, or other models")
    return task


def teacher_weights(specs: list[str], weights: list[float] | None = None,
                    weighting: str = "dice") -> tuple[list[float], str]:
    """Teacher weights for weighted fusion: given ones, else from each run's best validation Dice, else equal.

    ``dice`` weights by the Dice itself (teachers of similar quality get almost equal weights);
    ``inverse-error`` by ``1 / (1 - Dice)``, which favours the best teacher much more strongly.
    """
    look_up_option(weighting, WEIGHTINGS, "weighting")
    if weights is not None:
        if len(weights) != len(specs):
            raise NaktError(None, f"{len(weights)} weights for {len(specs)} teachers")
        return [float(w) for w in weights], "given"
    scores = []
    for spec in specs:
        scheme, rest = parse_spec(base_spec(spec))
        metrics = rundir.read_metrics(Path(rest)) if scheme == "run" else {}
        scores.append(rundir.best_score(metrics)[0])
    if any(s is None for s in scores):
        return [1.0] * len(specs), "equal (some teachers have no validation score)"
    if weighting == "inverse-error":
        return [1.0 / max(1.0 - float(s), 1e-3) for s in scores], "1 / (1 - validation dice)"
    return [float(s) for s in scores], "validation dice"


def label_arrays(models: list[NaktModel], image: np.ndarray, fusion: str = "mean",
                 weights: list[float] | None = None, path: Path | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """In-memory twin of `label` for networks: K models on one raw image ``[C_img, *spatial]``, fused.

    Returns ``(fused [C, *spatial], teacher_probs [K, C, *spatial], info)`` (`fuse_probs`).
    """
    return fuse_probs(np.stack([infer_probs(m, image, path) for m in models]), fusion, weights)


def fuse_probs(teacher_probs: np.ndarray, fusion: str = "mean", weights: list[float] | None = None,
               sharpen_temperature: float = 1.0,
               known: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fuse K teachers' probabilities ``[K, C, *spatial]``, then sharpen the result at `sharpen_temperature`;
    returns ``(fused [C, *spatial], teacher_probs, info)`` where `info` holds the teachers' agreement and, for
    the STAPLE rules, each teacher's estimated sensitivity and specificity, for trimmed-vote the dropped teacher.
    `known` ``[K, C]`` (bool): which teacher knows which class, when some know only some (`fuse_partial`)."""
    info = {"agreement": teacher_agreement(teacher_probs)} if len(teacher_probs) > 1 else {}
    if known is not None and not known.all():
        fused = fuse_partial(teacher_probs, known, fusion, weights)[0]
    elif fusion in ("staple", "staple-weighted"):
        fused, quality = staple_estimates(teacher_probs)
        info["staple"] = quality
        if fusion == "staple-weighted":
            fused = fuse(teacher_probs, "weighted", staple_weights(quality))
    elif fusion == "trimmed-vote":
        fused, info["dropped_teacher"] = trimmed_vote(teacher_probs, weights)  # an index into the teachers, or None
    else:
        fused = fuse(teacher_probs, fusion, weights)
    return sharpen(fused, sharpen_temperature), teacher_probs, info


def label(opts: LabelOptions) -> Path:
    """Annotate every image under ``opts.images`` with the fused teachers; returns the label-set folder.

    With ``num_parts`` > 1, or under torchrun, this process labels only its share of the cases (`nakt.sharding`);
    whichever part finds every case done consolidates the manifest."""
    opts.task = check_task(opts)
    opts.fusion = look_up_option(opts.fusion or default_fusion(opts.task, len(opts.teacher)), FUSIONS, "fusion")
    share = current_share(opts.num_parts, opts.part_id)
    if opts.task == "classification":
        if opts.sharpen != 1:
            raise NaktError(None, "--sharpen applies to segmentation label sets", "drop it (classification label "
                            "sets are softened or sharpened by the student's --temperature)")
        if share.parts > 1:
            raise NaktError(None, "classification label sets are written in one go, not in parts",
                            "run nakt label once, without --num-parts or torchrun")
        weights = teacher_weights(opts.teacher, opts.weights, opts.weighting)[0] if opts.fusion == "weighted" else None
        return label_classification(opts, weights)
    with process_group(share):
        return _label_segmentation(opts, share)


def _label_segmentation(opts: LabelOptions, share: Share) -> Path:
    out = Path(opts.out)
    cases = discover_cases(opts.images, cases=opts.cases, channels=opts.channels)
    device = share.device(pick_device(opts.device))
    fold = fold_pays(opts.precision, device)
    teachers = [load_teacher(t, device, trust=opts.trust_checkpoint, fold=fold) for t in opts.teacher]
    space = teacher_space(teachers, opts.label_map)
    values = space.values
    orientation = reading_orientation(teachers)
    weights, weight_source = (teacher_weights(opts.teacher, opts.weights, opts.weighting)
                              if opts.fusion == "weighted" else (None, "unused"))
    records = [{"spec": str(spec), "sha256": _checksum(str(spec)), "weight": None if weights is None else weights[i],
                "batchnorm_folded": t.batchnorm_folded if isinstance(t, NetTeacher) else None}
               for i, (spec, t) in enumerate(zip(opts.teacher, teachers))]
    header = {"nakt_version": __version__, "task": "segmentation", "images": str(opts.images),
              "fusion": opts.fusion, "sharpen": opts.sharpen, "weights_from": weight_source, "teachers": records,
              "classes": len(values), "label_values": values, "class_names": space.names,
              "label_mapping": space.record(), "orientation": orientation,
              "precision": resolve_precision(opts.precision, device), "tta": opts.tta,
              "batch_size": opts.batch_size or default_batch_size(teachers),
              "channels_last": any(resolve_layout(opts.layout, device, t.card.spatial_dims) for t in teachers
                                   if isinstance(t, NetTeacher)),
              "compile": opts.compile, "machine": this_machine().kind()}
    if share.parts > 1 and not share.distributed:
        _wait_for_sibling_claim(out)
    on_first_part(share, lambda: _claim_label_set(out, opts, header))
    if share.distributed and share.part != 0:
        _claim_label_set(out, opts, header, check_only=True)  # part 0 made it a label set already

    # Blocks of batch_size cases are the unit of batching, sharding and resuming (a block with any case left is
    # redone whole), so each case is always computed in the same batch: the same bytes however the run went.
    done = labelset.done_cases(out)
    chosen = [b for j, b in enumerate(blocks(len(cases), header["batch_size"]))
              if share.owns(j) and any(cases[i].name not in done for i in b)]
    desc = f"label {share.part + 1}/{share.parts}" if share.parts > 1 else "label"
    with (tqdm(total=sum(map(len, chosen)), desc=desc, unit="case", disable=not opts.progress) as bar,
          BackgroundWriter() as writer):
        for block in load_blocks(cases, chosen, orientation, teachers, opts.num_workers):
            with torch.profiler.record_function("nakt.label: networks"):  # named stages in torch.profiler tables
                per_teacher = [block_probs(t, block, header["precision"], opts.tta, opts.layout, opts.compile)
                               for t in teachers]
            writer.submit(_write_block, out, block, per_teacher, space, opts, weights, bar)
    share.barrier()
    if share.part == 0 or not share.distributed:
        _consolidate_if_done(out, header, [c.name for c in cases])
    return out


def _wait_for_sibling_claim(out: Path, timeout: float = 60.0) -> None:
    """Parts started together race to create `out`: while it holds only the temporary file of a sibling's
    first manifest, wait for that manifest rather than refuse the folder as not a label set."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and out.is_dir():
        entries = os.listdir(out)
        if not entries or not all(e.startswith(labelset.TMP_PREFIX) for e in entries):
            return
        time.sleep(0.05)


LAYOUT_NAMES = {True: "channels-last", False: "contiguous"}
# choices that change a label set's bytes: a set is resumed only with the ones it was made with
RESUME_CHOICES = ("precision", "tta", "batch_size", "sharpen", "channels_last", "compile")


def _choice(key: str, value) -> str:
    """A label set's recorded choice as the flag that makes it: ``with --layout contiguous``."""
    if key == "channels_last":  # a machine choice: --layout forces it
        return f"with --layout {LAYOUT_NAMES[value]}"
    if key == "compile":
        return "with --compile" if value else "without --compile"
    return f"with --{key.replace('_', '-')} {value}"


def _claim_label_set(out: Path, opts: LabelOptions, header: dict, check_only: bool = False) -> None:
    """Claim `out`: a new label set gets its manifest (header, no cases) first, so that even one interrupted in
    its first case is recognised and resumed; an existing one must come from the same teachers and fusion.
    `check_only`: `out` was just claimed by part 0, never replace it."""
    overwrite = opts.overwrite and not check_only
    if outputs.claim_output(out, outputs.LABEL_SET, overwrite, resume=not overwrite):
        previous = labelset.read_manifest(out)
        same = [t["sha256"] for t in previous.get("teachers", [])] == [t["sha256"] for t in header["teachers"]]
        if not same or previous.get("fusion") != opts.fusion:
            raise NaktError(out, "holds a label set made by other teachers or another fusion",
                            "choose a new --out folder, or --overwrite to replace it")
        if _class_mapping(previous, header) != _class_mapping(header, header):
            raise NaktError(out, "holds a label set whose teachers' classes were mapped or named otherwise",
                            "give the same --label-map and ?map=/?labels= to resume it, or choose a new --out")
        for key in RESUME_CHOICES:  # older sets, without some of these keys, resume with any
            if previous.get(key, header[key]) != header[key]:
                was, now = _choice(key, previous[key]), _choice(key, header[key])
                raise NaktError(out, f"holds a label set made {was}, not {now}",
                                f"run it {was} to resume it, or choose a new --out folder")
        return  # its manifest stays as it is until consolidation: rewriting it per run would race other parts
    labelset.write_manifest(out, {**header, "cases": {}})


def _class_mapping(manifest: dict, default: dict) -> tuple:
    """What a label set's classes are: values, names and each teacher's own value -> target value (the specs'
    spelling aside, as teachers are matched by checksum); keys an older set lacks read as `default`'s."""
    mapping = manifest.get("label_mapping", default["label_mapping"])
    return (manifest.get("label_values", default["label_values"]), manifest.get("class_names", default["class_names"]),
            [t["classes"] for t in mapping["by_teacher"]])


def _write_block(out: Path, block: list, per_teacher: list[list[np.ndarray]], space: Unified, opts: LabelOptions,
                 weights: list[float] | None, bar: tqdm) -> None:
    """Fuse and write every case of a block (on the background writer's thread)."""
    with torch.profiler.record_function("nakt.label: fuse and write"):
        for j, item in enumerate(block):
            teacher_probs = np.stack([space.to_target(k, probs[j]) for k, probs in enumerate(per_teacher)])
            _write_case(out, item.case.name, item.image, teacher_probs, space, opts, weights)
    bar.update(len(block))


def _write_case(out: Path, name: str, image, teacher_probs: np.ndarray, space: Unified, opts: LabelOptions,
                weights: list[float] | None) -> None:
    """Fuse one case's teacher probabilities ``[K, C, *spatial]`` (in the target space) and write its mask,
    probabilities and, last, its record: a case counts as done only once its files are complete."""
    fused, teacher_probs, info = fuse_probs(teacher_probs, opts.fusion, weights, opts.sharpen,
                                            space.known if space.partial else None)
    mask = decode_labels(hard_labels(fused, 0), space.values)
    mask_path = write_label(mask, image, out / "masks" / name)
    agreement = agreement_map(teacher_probs, fused) if len(teacher_probs) > 1 else None
    labelset.write_probs(out, name, fused, teacher_probs if opts.save_teacher_probs else None, agreement)
    labelset.write_record(out, name, {"mask": str(mask_path.relative_to(out)), "probs": f"probs/{name}.npz",
                                      **info})


def _consolidate_if_done(out: Path, header: dict, names: list[str]) -> bool:
    """Write the full manifest when every case of `names` is done (by this process or any other)."""
    if not set(names) <= labelset.done_cases(out):
        return False
    labelset.consolidate(out, header, names)
    return True
