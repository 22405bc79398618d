"""Classification labels: a CSV (``image,label``; or one 0/1 column per finding), class folders, or a label set
of class probabilities written by ``nakt label --task classification``.

A `LabelTable` lists images with their targets: class indices ``[N]`` (multi-class or graded), multi-hot
``[N, C]`` (multi-label) or probabilities ``[N, C]`` (a teacher's soft labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nakt.errors import NaktError
from nakt.io import labelset
from nakt.io.dataset import read_case_list
from nakt.io.images import case_name, is_image_file
from nakt.io.tables import read_rows

__all__ = ["LabelTable", "read_labels", "restrict", "list_images", "LABELS_CSV"]

LABELS_CSV = "labels.csv"


@dataclass
class LabelTable:
    """Images and targets. `kind`: ``index`` (targets ``[N]`` int), ``multihot`` or ``probs`` (``[N, C]``)."""

    images: list[Path]
    keys: list[str]
    targets: np.ndarray
    class_names: list[str]
    kind: str

    def subset(self, keep: list[int]) -> LabelTable:
        return LabelTable([self.images[i] for i in keep], [self.keys[i] for i in keep], self.targets[keep],
                          self.class_names, self.kind)


def list_images(images: str | Path) -> list[Path]:
    """Every image file under `images`, recursively, sorted (class folders included)."""
    root = Path(images)
    if not root.is_dir():
        raise NaktError(root, "images folder not found")
    files = sorted(p for p in root.rglob("*") if is_image_file(p))
    if not files:
        raise NaktError(root, "no images found")
    return files


def _key(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _from_folders(root: Path) -> LabelTable:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise NaktError(root, "no --labels CSV and no class folders", "give --labels FILE.csv or images/<class>/")
    images, targets = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if is_image_file(p))
        images += files
        targets += [index] * len(files)
    return LabelTable(images, [_key(p, root) for p in images], np.array(targets), classes, "index")


def _from_csv(root: Path, csv_path: Path, label_column: str | None, soft: bool) -> LabelTable:
    rows = read_rows(csv_path)
    if not rows:
        raise NaktError(csv_path, "no rows")
    columns = list(rows[0])
    image_column = "image" if "image" in columns else columns[0]
    images = []
    for row in rows:
        path = root / row[image_column]
        if not path.is_file():
            matches = list(root.glob(row[image_column] + ".*"))  # stems without extension are fine too
            if not matches:
                raise NaktError(csv_path, f"image {row[image_column]!r} not found under {root}")
            path = matches[0]
        images.append(path)
    keys = [_key(p, root) for p in images]
    try:
        if soft or (label_column is None and "label" not in columns):
            names = [c for c in columns if c not in (image_column, "patient")]
            values = np.array([[float(r[c]) for c in names] for r in rows], dtype=np.float32)
            kind = "probs" if soft else "multihot"
            if kind == "multihot" and not np.isin(values, (0, 1)).all():
                raise NaktError(csv_path, "multi-label columns must hold 0 or 1",
                                "for one label per image use a 'label' column or --label-column")
            return LabelTable(images, keys, values, names, kind)
        column = label_column or "label"
        if column not in columns:
            raise NaktError(csv_path, f"no column {column!r}", f"columns: {', '.join(columns)}")
        raw = [r[column] for r in rows]
    except ValueError as exc:
        raise NaktError(csv_path, f"non-numeric label ({exc})") from None
    numeric = all(v.lstrip("-").isdigit() for v in raw)
    names = sorted(set(raw), key=int if numeric else str)
    lookup = {v: i for i, v in enumerate(names)}
    return LabelTable(images, keys, np.array([lookup[v] for v in raw]), names, "index")


def read_labels(images: str | Path, labels: str | Path | None = None, cases=None,
                label_column: str | None = None) -> LabelTable:
    """Read targets for the images under `images` from `labels` (CSV file or label-set folder) or class folders.

    `cases` restricts to listed names (see `restrict`).
    """
    root = Path(images)
    if not root.is_dir():
        raise NaktError(root, "images folder not found")
    if labels is None:
        table = _from_folders(root)
    elif labelset.is_label_set(labels):
        table = _from_csv(root, Path(labels) / LABELS_CSV, None, soft=True)
    else:
        table = _from_csv(root, Path(labels), label_column, soft=False)
    return restrict(table, cases, root)


def restrict(table: LabelTable, cases, root: Path) -> LabelTable:
    """Keep the listed cases, matched by path relative to the images folder (with or without extension) or stem."""
    if cases is None:
        return table
    wanted = set(read_case_list(cases))
    keep = [i for i, (k, p) in enumerate(zip(table.keys, table.images))
            if k in wanted or k.rsplit(".", 1)[0] in wanted or case_name(p) in wanted]
    if not keep:
        raise NaktError(root, "no image matches the case list")
    return table.subset(keep)
