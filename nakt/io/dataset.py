"""Dataset discovery: an images folder plus an optional masks folder, paired by case name.

A case is either an image file (``images/<case>.<ext>``) or a folder of files (``images/<case>/``): a DICOM
series, or modality files stacked as channels (select and order them with `channels`, file-name globs). Masks
are paired by case name and may have another extension; for folder cases the mask may live inside the case
folder (`mask_file`, a glob). A case list (`cases`) restricts and orders the cases: a text file with one name
per line, a JSON list, or ``splits.json:key`` for one entry of a JSON object.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from nakt.errors import NaktError
from nakt.io.images import _is_dicom_folder, case_name, is_image_file
from nakt.io.outputs import atomic_path

__all__ = ["Case", "discover_cases", "read_case_list", "write_case_list"]


@dataclass
class Case:
    """One case: its name, the image file(s) stacked as channels, and its mask file if any."""

    name: str
    images: list[Path]
    mask: Path | None = None


def write_case_list(path: str | Path, names: list[str]) -> Path:
    """Write case names one per line (what `read_case_list` and ``--cases`` read), atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    return Path(path)


def read_case_list(spec: str | Path | list[str]) -> list[str]:
    """Case names from a list, a text file (one per line), a JSON list, or ``file.json:key``."""
    if isinstance(spec, (list, tuple)):
        return [str(c) for c in spec]
    spec = str(spec)
    key = None
    if ":" in spec and not Path(spec).exists():
        spec, key = spec.rsplit(":", 1)
    path = Path(spec)
    if not path.is_file():
        raise NaktError(path, "case list not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise NaktError(path, f"invalid JSON ({exc})") from None
        if key is not None:
            if not isinstance(data, dict) or key not in data:
                keys = ", ".join(data) if isinstance(data, dict) else "none"
                raise NaktError(path, f"no entry {key!r}", f"keys: {keys}")
            data = data[key]
        if not isinstance(data, list):
            raise NaktError(path, "expected a JSON list of case names", "or pass file.json:key")
        return [str(c) for c in data]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _case_files(folder: Path, channels: list[str] | None, mask_file: str | None) -> list[Path]:
    if _is_dicom_folder(folder):
        return [folder]
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if mask_file:
        files = [p for p in files if not fnmatch.fnmatch(p.name, mask_file)]
    if channels:
        picked = []
        for pattern in channels:
            hits = [p for p in files if fnmatch.fnmatch(p.name, pattern)]
            if len(hits) != 1:
                raise NaktError(folder, f"channel pattern {pattern!r} matches {len(hits)} files, expected 1",
                                f"files: {', '.join(p.name for p in files)}")
            picked += hits
        files = picked
    if not files:
        raise NaktError(folder, "case folder holds no image files")
    return files


def discover_cases(
    images: str | Path,
    masks: str | Path | None = None,
    cases: str | Path | list[str] | None = None,
    channels: list[str] | None = None,
    mask_file: str | None = None,
    require_masks: bool = False,
) -> list[Case]:
    """List the cases under `images`, paired with masks under `masks` by case name.

    With `require_masks`, a case without a mask is an error that names it.
    """
    images = Path(images)
    if not images.is_dir():
        raise NaktError(images, "images folder not found")
    entries = {}
    for p in sorted(images.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() or is_image_file(p):
            name = case_name(p)
            if name in entries:
                raise NaktError(p, f"two images share the case name {name!r}", f"other: {entries[name].name}")
            entries[name] = p
    if cases is not None:
        wanted = read_case_list(cases)
        missing = [c for c in wanted if c not in entries]
        if missing:
            raise NaktError(images, f"{len(missing)} listed case(s) have no image, e.g. {missing[0]!r}")
        entries = {c: entries[c] for c in wanted}
    if not entries:
        raise NaktError(images, "no images found", "supported: PNG, JPEG, TIFF, GIF, BMP, NIfTI, MHA, NRRD, DICOM")

    mask_index: dict[str, Path] = {}
    if masks is not None:
        masks = Path(masks)
        if not masks.is_dir():
            raise NaktError(masks, "masks folder not found")
        if mask_file is None:
            mask_index = {case_name(p): p for p in sorted(masks.iterdir()) if is_image_file(p)}
    result = []
    for name, path in entries.items():
        files = _case_files(path, channels, mask_file) if path.is_dir() else [path]
        mask = None
        if masks is not None and mask_file is not None:
            hits = sorted((masks / name).glob(mask_file)) if (masks / name).is_dir() else []
            mask = hits[0] if hits else None
        elif masks is not None:
            mask = mask_index.get(name)
        if require_masks and mask is None:
            raise NaktError(path, f"no mask for case {name!r} in {masks}")
        result.append(Case(name, files, mask))
    return result
