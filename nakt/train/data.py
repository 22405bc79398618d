"""Segmentation training data read from disk: a survey of the cases (one pass, one case in memory at a time),
their prepared images and targets cached up to a memory budget (MONAI `CacheDataset`) and beyond it written once
to a folder and read back on every access (`DiskCases`, as nnU-Net keeps its preprocessed cases on disk) or
prepared again on every access, and `TrainingSamples`, the Dataset the engine's DataLoader draws crops
and augmented samples from.

A prepared case is ``{"image": [C_in, *grid] float32, "target": ...}`` on the network's grid, the target being
class indices ``[*grid]`` (uint8, or int16 beyond 255 classes) from a mask, or probabilities ``[C, *grid]``
(float16) from a label set's soft labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nakt.errors import NaktError
from nakt.io import labelset, rundir
from nakt.io.dataset import Case
from nakt.io.images import read_image, read_mask
from nakt.models.card import ModelCard
from nakt.preprocess import encode_labels, one_hot, prepare_image, resize, target_size
from nakt.sharding import collective_device
from nakt.train.augment import Augmentation, sample_rng

__all__ = ["CaseInfo", "DiskCases", "MAX_LABELS", "PreparedCases", "TrainingSamples", "cached_cases", "hard_target",
           "label_values_of", "prepared_bytes", "read_label_map", "survey_cases"]

MAX_LABELS = 64


@dataclass(frozen=True)
class CaseInfo:
    """What the survey learns of a case without keeping its arrays."""

    case: Case
    spatial_shape: tuple[int, ...]
    channels: int
    label_values: tuple[int, ...]


def read_label_map(path: Path, like=None) -> np.ndarray:
    """`read_mask` for masks a user gives: refused when lossy (JPEG) or holding more than `MAX_LABELS` values
    (a photograph rather than a label map)."""
    if str(path).lower().endswith((".jpg", ".jpeg")):
        raise NaktError(path, "JPEG is lossy and cannot hold a label map",
                        "store masks as PNG, TIFF, NIfTI, MHA or NRRD")
    mask = read_mask(path, like=like)
    if len(np.unique(mask)) > MAX_LABELS:
        raise NaktError(path, f"holds more than {MAX_LABELS} distinct values: not a label map")
    return mask


def survey_cases(cases: list[Case], orientation: str = "RAS", progress: bool = True,
                 soft_from: Path | None = None, classes: int | None = None,
                 weights_from: Path | None = None) -> list[CaseInfo]:
    """Read every case once (3D volumes reoriented to `orientation`), checking that its mask (where it has one:
    online teachers may be all a case has) fits its image and, with `soft_from` (a label set of `classes`
    classes), that its probabilities do, and with `weights_from` (a label set) that it has the teachers'
    agreement map; keep only shapes and label values, so that the memory used does not grow with the number of
    cases."""
    infos = []
    for case in tqdm(cases, desc="survey", unit="case", disable=not progress, leave=False):
        image = read_image(case.images, orientation=orientation)
        mask = read_label_map(case.mask, like=image) if case.mask is not None else np.zeros(1, np.uint8)
        probs = labelset.read_probs(soft_from, case.name) if soft_from is not None else None
        if probs is not None and probs.shape != (classes, *image.spatial_shape):
            raise NaktError(labelset.probs_path(soft_from, case.name),
                            f"probabilities of shape {probs.shape} do not fit the image "
                            f"({classes} classes x {image.spatial_shape})")
        if weights_from is not None and labelset.read_probs(weights_from, case.name, "agreement") is None:
            raise NaktError(labelset.probs_path(weights_from, case.name), "holds no teacher agreement map",
                            "label with two or more teachers, or use --pixel-weights confidence")
        infos.append(CaseInfo(case, tuple(image.spatial_shape), image.array.shape[0],
                              tuple(int(v) for v in np.unique(mask))))
    return infos


def label_values_of(infos: list[CaseInfo]) -> list[int]:
    """The sorted union of label values over the cases' masks, 0 always included."""
    values = {0}
    for info in infos:
        values.update(info.label_values)
        if len(values) > MAX_LABELS:
            raise NaktError(info.case.mask, f"masks hold more than {MAX_LABELS} distinct values",
                            "is this an image rather than a label map, or a lossy (JPEG) mask?")
    return sorted(values)


def prepared_bytes(info: CaseInfo, card: ModelCard, soft: bool) -> int:
    """Memory one prepared case takes (image float32, target float16 probabilities or 1-2 byte indices)."""
    voxels = int(np.prod(target_size(card, info.spatial_shape)))
    target = 2 * card.classes if soft else (1 if card.classes <= 256 else 2)
    return voxels * (4 * card.in_channels + target)


def _prepare_transform(card: ModelCard, orientation: str, soft_from: Path | None, weights_from: Path | None):
    """A deterministic MONAI transform: `CaseInfo` -> prepared case (what `CacheDataset` caches), with the
    teachers' agreement ``"weight"`` ``[1, *grid]`` (float16) from `weights_from`."""
    from monai.transforms import Transform

    class PrepareCase(Transform):
        def __call__(self, info: CaseInfo) -> dict[str, torch.Tensor]:
            case = info.case
            image = read_image(case.images, orientation=orientation)
            grid = target_size(card, image.spatial_shape)
            probs = labelset.read_probs(soft_from, case.name) if soft_from is not None else None
            prepared = {"image": prepare_image(image.array, card, case.images[0])}
            if weights_from is not None:
                agreement = labelset.read_probs(weights_from, case.name, "agreement")
                prepared["weight"] = resize(torch.from_numpy(agreement)[None], grid).half()
            if probs is not None:
                target = resize(torch.from_numpy(probs), grid).half()
            elif case.mask is None:  # taught by online teachers alone
                return prepared
            else:
                labels = encode_labels(read_label_map(case.mask, like=image), card.label_values, case.mask)
                small = np.uint8 if card.classes <= 256 else np.int16
                target = resize(torch.from_numpy(labels.astype(small))[None], grid, mode="nearest")[0]
            return {**prepared, "target": target}

    return PrepareCase()


class DiskCases(torch.utils.data.Dataset):
    """Cases prepared on first access and written to `folder` (``<case>.pt``), read back on later accesses.

    Not MONAI's `PersistentDataset`: it writes in the system's temporary folder and moves the file into place,
    which across file systems is a copy that DataLoader workers or other DDP ranks can read half-written. Here
    each writer writes its own temporary file beside the target and renames it (atomic), and identical
    writers race harmlessly."""

    def __init__(self, infos: list[CaseInfo], prepare, folder: Path):
        self.infos, self.prepare, self.folder = infos, prepare, Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.infos)

    def _path(self, index: int) -> Path:
        return self.folder / f"{self.infos[index].case.name}.pt"

    def fill(self, workers: int = 1, progress: bool = True, rank: int = 0, world: int = 1) -> None:
        """Prepare and write the cases not yet on disk now, in `workers` threads, so that training epochs only
        read (what `CacheDataset` does for memory). Of `world` processes sharing the folder (DDP ranks), this
        one (`rank`) writes every `world`-th case only; `fill_shared` waits for the others."""
        from concurrent.futures import ThreadPoolExecutor

        missing = [i for i in range(rank, len(self), world) if not self._path(i).is_file()]
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for _ in tqdm(pool.map(self._write, missing), total=len(missing), desc="prepare", unit="case",
                          disable=not progress or not missing, leave=False):
                pass

    def fill_shared(self, workers: int = 1, progress: bool = True) -> None:
        """`fill` in a process group (torchrun): each rank prepares its share of the cases, then all wait until
        every share is written; a rank's error is raised in every rank rather than leaving the others waiting."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            self.fill(workers, progress)
            return
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        failed = torch.zeros(1, device=collective_device())  # nccl (GPU training) reduces GPU tensors only
        try:
            self.fill(workers, progress and rank == 0, rank, world)
        except Exception:
            failed += 1
            raise
        finally:
            torch.distributed.all_reduce(failed)  # also the barrier: every share is on disk after it
        if failed.item():
            raise NaktError(self.folder, "another training process failed while preparing its cases",
                            "see that process's error above")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self._path(index)
        if path.is_file():
            return rundir.read_prepared_case(path)
        return self._write(index)

    def _write(self, index: int) -> dict[str, torch.Tensor]:
        prepared = self.prepare(self.infos[index])
        rundir.write_prepared_case(self._path(index), prepared)
        return prepared


class PreparedCases(torch.utils.data.Dataset):
    """Prepared cases in order: the leading ones from `memory`, the others from `rest` (read back from disk when
    `on_disk`, else prepared from their source files on every access)."""

    def __init__(self, memory, rest, on_disk: bool):
        self.memory, self.rest, self.on_disk = memory, rest, on_disk

    def __len__(self) -> int:
        return len(self.memory) + len(self.rest)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.memory[index] if index < len(self.memory) else self.rest[index - len(self.memory)]

    @property
    def in_memory(self) -> int:
        return len(self.memory)

    @property
    def streamed(self) -> bool:
        """Whether some cases are decoded and prepared from their source files on every access."""
        return len(self.rest) > 0 and not self.on_disk


def cached_cases(infos: list[CaseInfo], card: ModelCard, budget: int, *, disk: Path | None = None,
                 orientation: str = "RAS", soft_from: Path | None = None, weights_from: Path | None = None,
                 workers: int = 1, progress: bool = True) -> tuple[PreparedCases, int]:
    """The prepared cases: the leading ones whose prepared size fits `budget` bytes are prepared once and held
    in memory (MONAI `CacheDataset`); the others are prepared now and written to `disk` (`DiskCases`: one file
    per case, read back on every access, so memory stays flat however many cases there are), or without `disk`
    prepared on every access. Both are prepared in `workers` threads. `disk` must belong to these cases and this
    preparation alone (its files are named after the case, not the transform). Returns (dataset, bytes held)."""
    from monai.data import CacheDataset, Dataset

    held = cached = 0
    for info in infos:
        size = prepared_bytes(info, card, soft_from is not None)
        if held + size > budget:
            break
        held, cached = held + size, cached + 1
    prepare = _prepare_transform(card, orientation, soft_from, weights_from)
    memory = CacheDataset(infos[:cached], prepare, num_workers=max(1, workers), progress=progress and cached > 0,
                          copy_cache=False)
    if disk is not None:
        rest = DiskCases(infos[cached:], prepare, disk)
        rest.fill_shared(workers, progress)  # under torchrun each rank prepares a share
    else:
        rest = Dataset(infos[cached:], prepare)
    return PreparedCases(memory, rest, on_disk=disk is not None), held


def hard_target(target: torch.Tensor) -> torch.Tensor:
    """Class indices ``[*grid]`` (int64) from either target form."""
    return target.float().argmax(0) if target.is_floating_point() else target.long()


def _crop(sample: dict[str, torch.Tensor], patch: tuple[int, ...], rng: np.random.Generator) -> dict:
    """A `patch` window of every tensor ``[C, *grid]`` of `sample` (image, probability target, pixel weights),
    padded first where the image is smaller (padding is background with certainty, weighted fully); half the
    windows centred on foreground, so that small structures are seen."""
    spatial = sample["image"].shape[1:]
    pad = [max(0, p - s) for p, s in zip(patch, spatial)]
    if any(pad):
        flat = [v for p in reversed(pad) for v in (p // 2, p - p // 2)]
        sample = {k: F.pad(v, flat, value=1.0 if k == "weight" else 0.0) for k, v in sample.items()}
        sample["target"][0][sample["target"].sum(0) == 0] = 1
        spatial = sample["image"].shape[1:]
    fg = torch.nonzero(sample["target"].argmax(0) > 0)
    if len(fg) and rng.random() < 0.5:
        centre = fg[rng.integers(len(fg))].tolist()
        start = [min(max(c - p // 2, 0), s - p) for c, p, s in zip(centre, patch, spatial)]
    else:
        start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, spatial)]
    window = (slice(None), *(slice(a, a + p) for a, p in zip(start, patch)))
    return {k: v[window] for k, v in sample.items()}


def _crop_image(image: torch.Tensor, patch: tuple[int, ...], rng: np.random.Generator) -> torch.Tensor:
    """`_crop` of an image without a target: a uniformly placed window."""
    background = torch.ones(1, *image.shape[1:])
    return _crop({"image": image, "target": background}, patch, rng)["image"]


class TrainingSamples(torch.utils.data.Dataset):
    """Training samples for the engine's DataLoader: ``samples[(index, seed)]`` is the prepared case `index`
    of `cases` (a `cached_cases` dataset), cropped to `patch` if given and augmented, all drawn from `seed`:
    ``{"image": [C_in, *grid], "target": [C, *grid]}`` (probabilities summing to 1), with ``"weight"``
    ``[1, *grid]`` (per-pixel loss weights) when the cases have it, and ``"known"`` ``[C]`` (bool: the classes
    the case's mask annotates) when `known` (one per case) is given."""

    def __init__(self, cases, classes: int, augmentation: Augmentation, patch: tuple[int, ...] | None = None,
                 known: list[torch.Tensor] | None = None):
        self.cases, self.classes, self.augmentation, self.patch = cases, classes, augmentation, patch
        self.known = known

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = item
        prepared = self.cases[index]
        if "target" not in prepared:  # online teachers supply it on the augmented batch
            image = _crop_image(prepared["image"], self.patch, sample_rng(seed)) if self.patch else prepared["image"]
            return self.augmentation({"image": image}, seed)
        target = prepared["target"]
        if target.is_floating_point():  # float16 storage rounds; targets must sum to 1 exactly
            target = target.float() / target.float().sum(0, keepdim=True).clamp_min(1e-6)
        else:
            target = one_hot(target[None], self.classes)[0]
        sample = {"image": prepared["image"], "target": target}
        if "weight" in prepared:
            sample["weight"] = prepared["weight"].float()
        if self.patch:
            sample = _crop(sample, self.patch, sample_rng(seed))
        sample = self.augmentation(sample, seed)
        return sample if self.known is None else {**sample, "known": self.known[index]}
