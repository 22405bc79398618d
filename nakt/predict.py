"""`nakt predict`: a trained model segments a folder of images; labels are written in each source's format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nakt.inference import infer_probs, pick_device
from nakt.io import labelset
from nakt.io.dataset import discover_cases
from nakt.io.images import read_image, write_label
from nakt.models import NaktModel, load
from nakt.preprocess import decode_labels

__all__ = ["PredictOptions", "predict", "predict_array"]


@dataclass
class PredictOptions:
    """Options of `predict` (flag names of ``nakt predict``)."""

    model: str
    images: str
    out: str
    cases: str | None = None
    channels: list[str] | None = None
    save_probs: bool = False
    device: str = "auto"
    progress: bool = True


def predict_array(model: NaktModel, image: np.ndarray) -> np.ndarray:
    """Label map ``[*spatial]`` in the model's label values for a raw image ``[C, *spatial]``."""
    return decode_labels(infer_probs(model, image).argmax(0), model.card.label_values)


def predict(opts: PredictOptions) -> Path:
    """Write ``out/<case>.<ext>`` for every image (and ``out/probs/<case>.npz`` with `save_probs`)."""
    model = load(opts.model).to(pick_device(opts.device))
    if model.card.task == "classification":
        from nakt.classify.stages import predict_classification

        return predict_classification(opts, model)
    cases = discover_cases(opts.images, cases=opts.cases, channels=opts.channels)
    out = Path(opts.out)
    for case in tqdm(cases, desc="predict", unit="case", disable=not opts.progress):
        image = read_image(case.images)
        probs = infer_probs(model, image.array, case.images[0])
        write_label(decode_labels(probs.argmax(0), model.card.label_values), image, out / case.name)
        if opts.save_probs:
            labelset.write_probs(out, case.name, probs)
    return out
