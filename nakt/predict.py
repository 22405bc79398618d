"""`nakt predict`: a trained model segments a folder of images; labels are written in each source's format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nakt.batched import INFERENCE_CHECKS, BackgroundWriter, InferenceOptions, LoadedCase, case_probs
from nakt.classify.stages import predict_classification
from nakt.config import check_device, check_options, option
from nakt.errors import NaktError
from nakt.fusion import hard_labels
from nakt.inference import infer_probs, pick_device
from nakt.io import labelset
from nakt.io.dataset import discover_cases
from nakt.io.images import write_label
from nakt.io.predictions import begin_predictions, end_predictions
from nakt.models import NaktModel
from nakt.models.card import TASKS
from nakt.preprocess import decode_labels
from nakt.teachers import NetTeacher, Teacher, fold_pays, load_teacher

__all__ = ["PredictOptions", "load_checked", "predict", "predict_array"]

@dataclass
class PredictOptions(InferenceOptions):
    """Options of `predict` (flag names of ``nakt predict``). `task`, when given, must be the model's.
    `overwrite` replaces an earlier predictions folder of nakt's (never a folder nakt did not write). Cases run
    in batches like `label`'s (`InferenceOptions`)."""

    model: str = option(help="any spec label accepts: run directory, torchscript:, onnx:, nnunet:, bundle:, masks:, "
                        "probs:", group="model")
    images: str = option(help="folder of images (files, or one folder per case)", group="data")
    out: str = option(help="folder for the predicted masks (new or empty)", group="output")
    task: str | None = option(None, "checked against the model's", group="model", choices=TASKS)
    cases: str | None = None
    channels: list[str] | None = None
    save_probs: bool = option(False, "also write each case's probabilities to OUT/probs/", group="output")
    trust_checkpoint: bool = False
    device: str = "auto"
    overwrite: bool = option(False, "replace an earlier nakt predictions folder", group="output")
    progress: bool = True

    def __post_init__(self) -> None:
        check_options(self, {"device": check_device, **INFERENCE_CHECKS})


def predict_array(model: NaktModel, image: np.ndarray) -> np.ndarray:
    """Label map ``[*spatial]`` in the model's label values for a raw image ``[C, *spatial]``."""
    return decode_labels(hard_labels(infer_probs(model, image), 0), model.card.label_values)


def load_checked(spec: str, task: str | None, device: str, trust: bool = False, precision: str = "auto") -> Teacher:
    """Any model spec `label` accepts, as a `Teacher` to run at `precision` (its BatchNorms folded in fp32:
    `nakt.teachers.fold_pays`); a given `task` must be its own."""
    teacher = load_teacher(spec, pick_device(device), trust=trust, fold=fold_pays(precision, pick_device(device)))
    if task is not None and task != teacher.card.task:
        raise NaktError(spec, f"is a {teacher.card.task} model, not {task}", f"use --task {teacher.card.task}")
    return teacher


def predict(opts: PredictOptions) -> Path:
    """Write ``out/<case>.<ext>`` for every image (and ``out/probs/<case>.npz`` with `save_probs`)."""
    teacher = load_checked(opts.model, opts.task, opts.device, opts.trust_checkpoint, opts.precision)
    info = {"batchnorm_folded": teacher.batchnorm_folded} if isinstance(teacher, NetTeacher) else None
    if teacher.card.task == "classification":
        return predict_classification(opts, teacher.model, info)
    cases = discover_cases(opts.images, cases=opts.cases, channels=opts.channels)
    out = begin_predictions(opts.out, opts.model, [c.name for c in cases], opts.overwrite, info)
    with (tqdm(total=len(cases), desc="predict", unit="case", disable=not opts.progress) as bar,
          BackgroundWriter() as writer):
        for item, probs in case_probs(teacher, cases, opts, pick_device(opts.device)):
            writer.submit(_write_case, out, item, probs, teacher, opts.save_probs, bar)
    end_predictions(out, opts.model, [c.name for c in cases], info)
    return out


def _write_case(out: Path, item: LoadedCase, probs: np.ndarray, teacher: Teacher, save_probs: bool, bar: tqdm) -> None:
    """Write a case's label map (and probabilities), on the background writer's thread."""
    write_label(decode_labels(hard_labels(probs, 0), teacher.card.label_values), item.image, out / item.case.name)
    if save_probs:
        labelset.write_probs(out, item.case.name, probs)
    bar.update(1)
