"""`nakt evaluate`: Dice and HD95 per case and on average, from a model or from predictions on disk.

Writes ``summary.json``: ``{"mean": {"dice", "hd95"}, "std": {...}, "per_case": [{"case", "dice", "hd95",
"dice_per_class"}, ...]}``; ``mean.dice`` is the mean over cases of the foreground Dice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nakt import __version__
from nakt.config import at_least, check_device, check_options, one_of
from nakt.errors import NaktError
from nakt.io import outputs
from nakt.io.dataset import discover_cases
from nakt.io.images import read_image, read_mask
from nakt.io.rundir import write_json
from nakt.metrics import case_scores
from nakt.predict import load_checked
from nakt.preprocess import decode_labels, encode_labels
from nakt.teachers import Teacher, reading_orientation
from nakt.train.data import read_label_map

__all__ = ["EvaluateOptions", "evaluate", "summarize"]


@dataclass
class EvaluateOptions:
    """Options of `evaluate`: give `model` (a run) or `pred` (a folder of predicted masks), not both.

    For a classification run, `labels` (CSV) or class folders give the truth; `graded` adds quadratic kappa
    (automatic for ordinal heads); `attack` (``fgsm`` or ``pgd``, with `eps` and `steps`) scores the model on
    adversarial versions of the images.

    `roi` is a folder of region masks paired by case name (e.g. a fundus field of view): pixels outside them
    count as background in both prediction and truth.
    """

    images: str
    out: str
    masks: str | None = None
    task: str | None = None
    labels: str | None = None
    label_column: str | None = None
    graded: bool = False
    attack: str | None = None
    eps: float = 0.01
    steps: int = 10
    model: str | None = None
    pred: str | None = None
    cases: str | None = None
    channels: list[str] | None = None
    mask_file: str | None = None
    roi: str | None = None
    hd95: bool = True
    trust_checkpoint: bool = False
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_options(self, {"task": one_of("segmentation", "classification"), "attack": one_of("fgsm", "pgd"),
                             "eps": at_least(0), "steps": at_least(1), "device": check_device})
        if (self.model is None) == (self.pred is None):
            raise NaktError(None, "give either --model RUN or --pred DIR (one of them)")
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


def _match_binary_codings(pairs: list[tuple]) -> tuple[list[tuple], list[int]]:
    """The label values to score, recoding predictions when both sides are binary but coded differently.

    Two annotators' binary masks are often saved as 0/1 and 0/255; scored as they are, the two foregrounds
    would count as two disjoint classes (Dice 0). Multi-class maps are never recoded.
    """
    pred_values = {int(v) for _, p, _, _ in pairs for v in np.unique(p)} - {0}
    truth_values = {int(v) for _, _, t, _ in pairs for v in np.unique(t)} - {0}
    if len(pred_values) == 1 and len(truth_values) == 1 and pred_values != truth_values:
        (fg,) = truth_values
        pairs = [(name, np.where(p > 0, fg, 0), t, spacing) for name, p, t, spacing in pairs]
        pred_values = truth_values
    return pairs, sorted({0} | pred_values | truth_values)


def evaluate(opts: EvaluateOptions) -> dict:
    """Score predictions against masks; writes ``out/summary.json`` and returns the summary.

    `out` must be new, empty, or an earlier evaluation of nakt's (with `overwrite`); a folder this call made
    is removed again when scoring fails."""
    teacher = None
    if opts.model is not None:
        teacher = load_checked(opts.model, opts.task, opts.device, opts.trust_checkpoint)
    if (teacher is None or teacher.card.task == "segmentation") and opts.masks is None:
        raise NaktError(None, "missing option 'masks'", "give --masks DIR")
    with outputs.fresh_output(opts.out, outputs.EVALUATION, opts.overwrite):
        if teacher is not None and teacher.card.task == "classification":
            from nakt.classify.stages import evaluate_classification

            return evaluate_classification(opts, teacher.model)
        return _evaluate_masks(opts, teacher)


def _evaluate_masks(opts: EvaluateOptions, teacher: Teacher | None) -> dict:
    cases = discover_cases(opts.images, opts.masks, opts.cases, opts.channels, opts.mask_file,
                           require_masks=True)
    pred_cases = None
    if opts.model is None:
        pred_cases = {c.name: c for c in discover_cases(opts.pred)}
        missing = [c.name for c in cases if c.name not in pred_cases]
        if missing:
            raise NaktError(opts.pred, f"no prediction for {len(missing)} case(s), e.g. {missing[0]!r}")
    rois = {c.name: c.mask for c in discover_cases(opts.images, opts.roi, opts.cases, opts.channels,
                                                   require_masks=True)} if opts.roi else {}
    pairs = []
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not opts.progress):
        image = read_image(case.images, orientation=reading_orientation([teacher]) if teacher else "RAS")
        truth = read_label_map(case.mask, like=image)
        if teacher is not None:
            pred = decode_labels(teacher.case_probs(case, image).argmax(0), teacher.card.label_values)
        else:
            pred = read_label_map(pred_cases[case.name].images[0], like=image)
        if rois:
            outside = read_mask(rois[case.name], like=image) == 0
            pred, truth = np.where(outside, 0, pred), np.where(outside, 0, truth)
        pairs.append((case.name, pred, truth, image.spacing))
    if teacher is not None:
        values = list(teacher.card.label_values)
    else:
        pairs, values = _match_binary_codings(pairs)
    per_case = []
    for (name, pred, truth, spacing), case in zip(pairs, cases):
        scores = case_scores(encode_labels(pred, values), encode_labels(truth, values, case.mask), len(values),
                             spacing=spacing, hd95=opts.hd95)
        per_case.append({"case": name, **scores})
    summary = {"format": "nakt.summary/1", "nakt_version": __version__, **summarize(per_case),
               "label_values": values, "model": opts.model, "pred": opts.pred, "roi": opts.roi}
    write_json(Path(opts.out) / "summary.json", summary)
    return summary
