"""Label sets: ``masks/<case>.<ext>`` (hard fused labels in the source's format and geometry),
``probs/<case>.npz`` (key ``probs``: fused soft probabilities, float16 ``[C, *spatial]``; optionally
``teacher_probs`` ``[K, C, *spatial]``) and ``manifest.json``. The only module that touches them.

While labelling runs, each finished case gets one small record, ``cases/<case>.json``, written atomically after
its mask and probabilities: the work per case stays constant however many cases there are (rewriting one
growing manifest after every case would cost time quadratic in the number of cases). The manifest holds the
header from the start and is consolidated with every case's record at the end.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from nakt.errors import NaktError
from nakt.io.outputs import atomic_path
from nakt.io.rundir import write_json

__all__ = [
    "LABELSET_FORMAT",
    "is_label_set",
    "probs_path",
    "read_case_records",
    "read_manifest",
    "read_probs",
    "write_case_record",
    "write_manifest",
    "write_probs",
]

LABELSET_FORMAT = "nakt.labelset/1"
MANIFEST = "manifest.json"


def is_label_set(path: str | Path) -> bool:
    """True when `path` holds a manifest.json written by nakt label."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return str(json.loads(manifest.read_text()).get("format", "")).startswith("nakt.labelset/")
    except (json.JSONDecodeError, AttributeError):
        return False


def read_manifest(path: str | Path) -> dict:
    manifest = Path(path) / MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NaktError(manifest, f"cannot read label-set manifest ({exc})") from None
    if not str(data.get("format", "")).startswith("nakt.labelset/"):
        raise NaktError(manifest, f"unknown format {data.get('format')!r}", f"expected {LABELSET_FORMAT}")
    return data


def write_manifest(path: str | Path, manifest: dict) -> None:
    write_json(Path(path) / MANIFEST, {"format": LABELSET_FORMAT, **manifest})


def probs_path(label_set: str | Path, case: str) -> Path:
    return Path(label_set) / "probs" / f"{case}.npz"


def write_probs(label_set: str | Path, case: str, probs: np.ndarray, teacher_probs: np.ndarray | None = None):
    """Write a case's fused (and optionally per-teacher) probabilities, compressed float16, atomically."""
    arrays = {"probs": probs.astype(np.float16)}
    if teacher_probs is not None:
        arrays["teacher_probs"] = teacher_probs.astype(np.float16)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with atomic_path(probs_path(label_set, case)) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return probs_path(label_set, case)


def read_probs(label_set: str | Path, case: str, key: str = "probs") -> np.ndarray | None:
    """A case's fused probabilities ``[C, *spatial]`` as float32, or None when the label set has none."""
    path = probs_path(label_set, case)
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return data[key].astype(np.float32)
    except Exception as exc:
        raise NaktError(path, f"cannot read probabilities ({type(exc).__name__}: {exc})") from None


RECORDS = "cases"


def write_case_record(label_set: str | Path, case: str, record: dict) -> None:
    """Mark `case` done: its record (mask path, agreement, STAPLE estimates...), written atomically."""
    write_json(Path(label_set) / RECORDS / f"{case}.json", record)


def read_case_records(label_set: str | Path) -> dict[str, dict]:
    """Every finished case's record, by case name (a record is complete or absent: they are written
    atomically)."""
    folder = Path(label_set) / RECORDS
    if not folder.is_dir():
        return {}
    records = {}
    for path in sorted(folder.glob("*.json")):
        try:
            records[path.name[: -len(".json")]] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise NaktError(path, f"cannot read case record ({exc})") from None
    return records
