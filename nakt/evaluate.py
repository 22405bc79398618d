"""`nakt evaluate`: Dice and HD95 per case and on average, from a model or from predictions on disk.

Writes ``summary.json``: ``{"mean": {"dice", "hd95"}, "std": {...}, "per_case": [{"case", "dice", "hd95",
"dice_per_class"}, ...]}``; ``mean.dice`` is the mean over cases of the foreground Dice. With `cost`, also
``"cost"``: the model's parameters, FLOPs and measured latency per case (`nakt.cost`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nakt.batched import INFERENCE_CHECKS, BackgroundWriter, InferenceOptions, case_probs
from nakt.classify.robustness import ATTACKS
from nakt.classify.stages import evaluate_classification
from nakt.config import at_least, check_device, check_options, option
from nakt.cost import case_cost, onnx_latency
from nakt.errors import NaktError
from nakt.fusion import hard_labels
from nakt.inference import pick_device
from nakt.io import labelset, outputs
from nakt.io.dataset import Case, discover_cases
from nakt.io.images import Image, case_name, is_image_file, read_image, read_mask
from nakt.io.summary import write_summary
from nakt.metrics import case_scores
from nakt.models import parse_spec
from nakt.models.card import TASKS
from nakt.predict import load_checked
from nakt.preprocess import decode_labels, encode_labels
from nakt.teachers import Teacher
from nakt.train.data import read_label_map

__all__ = ["EvaluateOptions", "evaluate", "summarize"]


@dataclass
class EvaluateOptions(InferenceOptions):
    """Options of `evaluate`: give `model` (a run) or `pred` (a folder of predicted masks), not both.

    For a classification run, `labels` (CSV) or class folders give the truth; `graded` adds quadratic kappa
    (automatic for ordinal heads); `attack` (``fgsm`` or ``pgd``, with `eps` and `steps`) scores the model on
    adversarial versions of the images.

    `roi` is a folder of region masks paired by case name (e.g. a fundus field of view): pixels outside them
    count as background in both prediction and truth. A model runs on batches of cases like `label`'s
    (`InferenceOptions`); cases are scored as they come, so memory does not grow with their number.
    """

    images: str = option(help="folder of images (files, or one folder per case)", group="data")
    out: str = option(help="folder for summary.json (new or empty)", group="output")
    masks: str | None = option(None, "folder of true masks paired by case name", group="data")
    task: str | None = option(None, "checked against the model's", group="model", choices=TASKS)
    labels: str | None = option(None, "CSV (image,label or one 0/1 column per finding) or a label set; default: "
                                "class folders under --images", group="classification")
    label_column: str | None = option(None, "the CSV column holding the class (default: label)",
                                      group="classification")
    graded: bool = option(False, "add quadratic kappa", group="classification")
    attack: str | None = option(None, "score under an adversarial attack", group="classification", choices=ATTACKS)
    eps: float = option(0.01, "attack size in normalised intensity units", group="classification")
    steps: int = option(10, "PGD steps", group="classification")
    model: str | None = option(None, "model to evaluate: any spec label accepts", group="model")
    pred: str | None = option(None, "folder of predicted masks (instead of --model)", group="model")
    cases: str | None = None
    channels: list[str] | None = None
    mask_file: str | None = None
    roi: str | None = option(None, "folder of region masks (e.g. a field of view); outside counts as background",
                             group="segmentation")
    hd95: bool = option(True, "skip the HD95 distances (Dice only)", group="segmentation")
    cost: bool = option(False, "add the model's parameters, FLOPs and latency per case on this machine (and, for "
                        "a run, through ONNX Runtime) to summary.json", group="model")
    trust_checkpoint: bool = False
    device: str = "auto"
    overwrite: bool = option(False, "replace an earlier nakt evaluation", group="output")
    progress: bool = True

    def __post_init__(self) -> None:
        check_options(self, {"eps": at_least(0), "steps": at_least(1), "device": check_device,
                             **INFERENCE_CHECKS})
        if (self.model is None) == (self.pred is None):
            raise NaktError(None, "give either --model RUN or --pred DIR (one of them)")
        if self.pred is not None and self.cost:
            raise NaktError(None, "--cost measures a model", "give --model RUN (not --pred)")
        if self.pred is not None and self.task == "classification":
            raise NaktError(None, "--pred scores segmentation masks on disk", "for classification give --model RUN")


def summarize(per_case: list[dict]) -> dict:
    """Mean and standard deviation over cases of each score (None values skipped)."""
    mean, std = {}, {}
    for key in ("dice", "hd95"):
        values = [c[key] for c in per_case if c.get(key) is not None]
        mean[key] = float(np.mean(values)) if values else None
        std[key] = float(np.std(values)) if values else None
    return {"mean": mean, "std": std, "per_case": per_case}


def evaluate(opts: EvaluateOptions) -> dict:
    """Score predictions against masks; writes ``out/summary.json`` and returns the summary.

    `out` must be new, empty, or an earlier evaluation of nakt's (with `overwrite`); a folder this call made
    is removed again when scoring fails."""
    teacher = None
    if opts.model is not None:
        teacher = load_checked(opts.model, opts.task, opts.device, opts.trust_checkpoint, opts.precision)
    if (teacher is None or teacher.card.task == "segmentation") and opts.masks is None:
        raise NaktError(None, "missing option 'masks'", "give --masks DIR")
    with outputs.fresh_output(opts.out, outputs.EVALUATION, opts.overwrite):
        if teacher is not None and teacher.card.task == "classification":
            if opts.cost:
                raise NaktError(opts.model, "--cost measures segmentation models", "drop --cost")
            return evaluate_classification(opts, teacher.model)
        return _evaluate_masks(opts, teacher)


def _scored_values(pred_paths: list[Path], truth_paths: list[Path]) -> tuple[list[int], int | None]:
    """The label values to score predictions on disk with, and the truth's foreground value when predictions
    must be recoded to it: two annotators' binary masks are often saved as 0/1 and 0/255, and scored as they are
    the two foregrounds would count as two disjoint classes (Dice 0). Multi-class maps are never recoded.
    Reads the label maps once more (without holding them), so scoring itself can stream."""
    pred_values = {int(v) for path in pred_paths for v in np.unique(read_label_map(path))} - {0}
    truth_values = {int(v) for path in truth_paths for v in np.unique(read_label_map(path))} - {0}
    if len(pred_values) == 1 and len(truth_values) == 1 and pred_values != truth_values:
        return sorted({0} | truth_values), next(iter(truth_values))
    return sorted({0} | pred_values | truth_values), None


def _binary_as(truth: np.ndarray, foreground: int) -> np.ndarray:
    """A binary truth whose foreground has another value than a binary model's (0/255 masks, a model trained on
    0/1) recoded to the model's: one foreground each is the same class, as `nakt label` fuses such teachers
    (`nakt.labelspace`). Multi-class truths are left alone (scoring then names the value it does not know)."""
    others = np.unique(truth[truth != 0])
    if len(others) == 1 and others[0] != foreground:
        return np.where(truth != 0, foreground, 0).astype(truth.dtype)
    return truth


def _evaluate_masks(opts: EvaluateOptions, teacher: Teacher | None) -> dict:
    cases = discover_cases(opts.images, opts.masks, opts.cases, opts.channels, opts.mask_file,
                           require_masks=True)
    rois = {c.name: c.mask for c in discover_cases(opts.images, opts.roi, opts.cases, opts.channels,
                                                   require_masks=True)} if opts.roi else {}
    per_case: list[dict] = []
    names: list[str] | None = None

    def score(case: Case, image: Image, pred: np.ndarray, values: list[int]) -> None:
        truth = read_label_map(case.mask, like=image)
        if teacher is not None and len(values) == 2 and values[0] == 0:
            truth = _binary_as(truth, values[1])
        if rois:
            outside = read_mask(rois[case.name], like=image) == 0
            pred, truth = np.where(outside, 0, pred), np.where(outside, 0, truth)
        scores = case_scores(encode_labels(pred, values), encode_labels(truth, values, case.mask), len(values),
                             spacing=image.spacing, hd95=opts.hd95)
        per_case.append({"case": case.name, **scores})

    with tqdm(total=len(cases), desc="evaluate", unit="case", disable=not opts.progress) as bar:
        if teacher is not None:
            values, names = list(teacher.card.label_values), list(teacher.card.class_names)
            with BackgroundWriter() as scorer:  # scoring (HD95 above all) overlaps the next batch's inference
                for item, probs in case_probs(teacher, cases, opts, pick_device(opts.device)):
                    pred = decode_labels(hard_labels(probs, 0), teacher.card.label_values)
                    scorer.submit(score, item.case, item.image, pred, values)
                    scorer.submit(bar.update, 1)
        else:
            pred_files = _prediction_files(opts.pred, cases)
            values, recode_to = _scored_values(pred_files, [c.mask for c in cases])
            for case, pred_file in zip(cases, pred_files):
                image = read_image(case.images, orientation="RAS")
                pred = read_label_map(pred_file, like=image)
                score(case, image, pred if recode_to is None else np.where(pred > 0, recode_to, 0), values)
                bar.update(1)
    extra = {"cost": _cost(teacher, cases[0], opts)} if opts.cost else {}
    # dice_per_class lists the foreground classes: these are their values and names
    return write_summary(opts.out, {**summarize(per_case), "label_values": values,
                                    "class_names": names or [str(v) for v in values], "model": opts.model,
                                    "pred": opts.pred, "roi": opts.roi, **extra})


def _cost(teacher: Teacher, case: Case, opts: EvaluateOptions) -> dict:
    """`nakt.cost.case_cost` of the evaluated model on the first case, in the run's precision; a nakt run is
    also exported to ONNX and timed under ONNX Runtime."""
    cost = case_cost([teacher], case, opts.precision)
    note = {}
    if parse_spec(opts.model)[0] == "run":
        if importlib.util.find_spec("onnxruntime") is None:
            note = {"onnx_note": 'onnxruntime is not installed: pip install "nakt[onnx]"'}
        else:
            cost.onnx_latency_s = onnx_latency(opts.model, case)
    return {**cost.to_json(), "case": case.name, **note}


def _prediction_files(pred: str, cases: list[Case]) -> list[Path]:
    """Each case's predicted label map under `pred`, paired by case name: a folder of masks, a nakt predictions
    folder (its ``probs/`` is not a case) or a nakt label set (its ``masks/``)."""
    if labelset.is_label_set(pred):
        pred = str(Path(pred) / "masks")
    if outputs.holds_output(pred, outputs.PREDICTIONS):
        found = {case_name(p): p for p in sorted(Path(pred).iterdir()) if p.is_file() and is_image_file(p)}
    else:
        found = {c.name: c.images[0] for c in discover_cases(pred)}
    missing = [c.name for c in cases if c.name not in found]
    if missing:
        raise NaktError(pred, f"no prediction for {len(missing)} case(s), e.g. {missing[0]!r}")
    return [found[c.name] for c in cases]
