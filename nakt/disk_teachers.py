"""Predictions on disk as teachers: ``masks:DIR`` (hard labels from any tool) and ``probs:DIR`` (nnU-Net's
``--save_probabilities`` outputs, or a nakt label set's probabilities), paired with the images by case name.

Tools that cannot run in-process (TotalSegmentator, vendor software, a colleague's model) still vote, and
STAPLE estimates their quality. Files are read without unpickling anything (nnU-Net's .pkl files are ignored).
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import torch

from nakt.errors import NaktError
from nakt.io import labelset
from nakt.io.dataset import Case
from nakt.io.images import Image, case_name, is_image_file, read_mask
from nakt.models.card import ModelCard
from nakt.models.nnunet import nnunet_probs_to_grid
from nakt.models.registry import scheme

__all__ = ["MaskTeacher", "ProbsTeacher", "split_query"]


def split_query(rest: str) -> tuple[str, dict[str, str]]:
    """``"DIR?a=1&b=2"`` -> ``("DIR", {"a": "1", "b": "2"})``."""
    path, _, query = rest.partition("?")
    return path, {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}


def _folder(path: str, spec: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise NaktError(folder, "folder not found", f"{spec.split(':')[0]}:DIR names a folder of predictions")
    return folder


def _values_option(options: dict[str, str], spec: str) -> list[int] | None:
    if "labels" not in options:
        return None
    try:
        return sorted({0} | {int(v) for v in options["labels"].split(",") if v.strip()})
    except ValueError:
        raise NaktError(None, f"{spec}: labels must be integers, e.g. ?labels=0,1,2") from None


class MaskTeacher:
    """``masks:DIR[?labels=0,1,2]``: one label map per case (``DIR/<case>.<ext>``, any lossless format nakt
    reads), turned into one-hot probabilities. Its label values are `labels` when given, else every value found
    in its masks (one pass over the folder). Masks are read in the geometry of the case's image, so they follow
    its orientation."""

    orientation = None  # adapts to the image

    def __init__(self, rest: str, spec: str, device: torch.device | None = None):
        path, options = split_query(rest)
        self.spec, self.folder = spec, _folder(path, spec)
        self.files = {case_name(p): p for p in sorted(self.folder.iterdir()) if is_image_file(p)}
        if not self.files:
            raise NaktError(self.folder, "holds no mask files")
        first = read_mask(next(iter(self.files.values())))
        values = _values_option(options, spec)
        if values is None:
            found = {0}
            for file in self.files.values():
                found.update(int(v) for v in np.unique(read_mask(file)))
            values = sorted(found)
        self.card = ModelCard(spec=spec, in_channels=1, classes=len(values), spatial_dims=first.ndim,
                              label_values=values)

    def case_probs(self, case: Case, image: Image) -> np.ndarray:
        if case.name not in self.files:
            raise NaktError(self.folder, f"no mask for case {case.name!r}")
        mask = read_mask(self.files[case.name], like=image)
        lut = {v: i for i, v in enumerate(self.card.label_values)}
        unknown = sorted({int(v) for v in np.unique(mask)} - set(lut))
        if unknown:
            raise NaktError(self.files[case.name], f"holds label values {unknown} outside {self.card.label_values}",
                            f"declare them: {self.spec.split('?')[0]}?labels=...")
        probs = np.zeros((len(lut), *mask.shape), np.float32)
        for value, index in lut.items():
            probs[index][mask == value] = 1.0
        return probs


class ProbsTeacher:
    """``probs:DIR``: per-case probabilities. Either a nakt label set (``probs/<case>.npz``, key ``probs``, on the
    image grid in the label set's orientation; label values from its manifest) or an nnU-Net predictions folder
    (``<case>.npz``, key ``probabilities``, in nnU-Net's array order; label values from the dataset.json that
    nnUNetv2_predict copies beside them)."""

    def __init__(self, rest: str, spec: str, device: torch.device | None = None):
        path, options = split_query(rest)
        self.spec, self.folder = spec, _folder(path, spec)
        self.nakt = labelset.is_label_set(self.folder)
        if self.nakt:
            manifest = labelset.read_manifest(self.folder)
            values = [int(v) for v in manifest["label_values"]]
            self.orientation = manifest.get("orientation", "RAS")
        else:
            values, self.orientation = _values_option(options, spec) or self._nnunet_values(), None
        files = sorted((self.folder / "probs" if self.nakt else self.folder).glob("*.npz"))
        if not files:
            raise NaktError(self.folder, "holds no <case>.npz probability files")
        self.files = {f.name[: -len(".npz")]: f for f in files}
        shape = self._read(next(iter(self.files.values()))).shape
        dims = 2 if not self.nakt and len(shape) == 4 and shape[1] == 1 else len(shape) - 1  # nnU-Net 2D: [C, 1, H, W]
        self.card = ModelCard(spec=spec, in_channels=1, classes=len(values), spatial_dims=dims, label_values=values,
                              orientation=self.orientation or "RAS")

    def _nnunet_values(self) -> list[int]:
        dataset = self.folder / "dataset.json"
        if not dataset.is_file():
            raise NaktError(self.folder, "has no manifest.json (nakt label set) nor dataset.json (nnU-Net predictions)",
                            "or give the label values: probs:DIR?labels=0,1,2")
        labels = json.loads(dataset.read_text(encoding="utf-8")).get("labels", {})
        if any(not isinstance(v, int) for v in labels.values()):
            raise NaktError(dataset, "region-based labels (lists of values) are not supported")
        return sorted(labels.values())

    def _read(self, path: Path) -> np.ndarray:
        key = "probs" if self.nakt else "probabilities"
        try:
            with np.load(path, allow_pickle=False) as data:
                return data[key].astype(np.float32)
        except Exception as exc:
            raise NaktError(path, f"cannot read probabilities under key {key!r} ({type(exc).__name__})") from None

    def case_probs(self, case: Case, image: Image) -> np.ndarray:
        if case.name not in self.files:
            raise NaktError(self.folder, f"no probabilities for case {case.name!r}")
        probs = self._read(self.files[case.name])
        if not self.nakt:
            probs = nnunet_probs_to_grid(probs, image)
        if probs.shape != (self.card.classes, *image.spatial_shape):
            raise NaktError(self.files[case.name], f"probabilities of shape {probs.shape} do not fit the image "
                            f"({self.card.classes} classes x {image.spatial_shape})")
        return probs


@scheme("masks", "teacher")
def _load_masks(rest: str, spec: str, device: torch.device) -> MaskTeacher:
    return MaskTeacher(rest, spec, device)


@scheme("probs", "teacher")
def _load_probs(rest: str, spec: str, device: torch.device) -> ProbsTeacher:
    return ProbsTeacher(rest, spec, device)
