"""Tables of images (classification): the labels CSV a user gives, and the class-probability tables nakt writes
(a classification label set's ``labels.csv``, ``nakt predict``'s ``predictions.csv``)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from nakt.errors import NaktError
from nakt.io.outputs import atomic_path

__all__ = ["read_annotated_classes", "read_rows", "write_class_table"]


def read_rows(path: str | Path, what: str = "labels") -> list[dict[str, str]]:
    """The rows of a CSV file as ``{column: value}`` (a UTF-8 byte-order mark, as spreadsheets write, is
    dropped); an unreadable file is one line naming it."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except OSError as exc:
        raise NaktError(path, f"cannot read {what} ({exc.strerror})") from None


def read_annotated_classes(path: str | Path) -> dict[str, list[str] | None]:
    """Which classes each case's mask annotates, from a CSV ``case,classes``: `classes` lists label values or
    class names separated by spaces or ``;``, or is ``all``; returns ``{case: [value or name, ...]}`` (None:
    all). Background is annotated wherever anything is, and needs no listing.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "annotated.csv"
    >>> _ = path.write_text("case,classes\\ncase0,1;2\\ncase1,kidney\\ncase2,all\\n")
    >>> read_annotated_classes(path)
    {'case0': ['1', '2'], 'case1': ['kidney'], 'case2': None}
    """
    rows = read_rows(path, "the annotated classes")
    if not rows or not {"case", "classes"} <= set(rows[0]):
        raise NaktError(path, "needs the columns case,classes (one row per partially annotated case)")
    annotated: dict[str, list[str] | None] = {}
    for line, row in enumerate(rows, start=2):
        case, listed = (row["case"] or "").strip(), (row["classes"] or "").replace(";", " ").split()
        if not case or not listed:
            raise NaktError(path, f"line {line}: a case and at least one class (or 'all') are needed")
        if case in annotated:
            raise NaktError(path, f"line {line}: case {case!r} is listed twice")
        annotated[case] = None if listed == ["all"] else listed
    return annotated


def write_class_table(path: str | Path, keys: list[str], class_names: list[str], probs: np.ndarray,
                      extra: dict[str, list] | None = None) -> None:
    """Write ``image,<class>...[,<extra>...]``: one row per image key with its class probabilities ``[N, C]``
    (6 decimals) and the `extra` columns, atomically.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "labels.csv"
    >>> write_class_table(path, ["a.png"], ["no", "yes"], np.array([[0.25, 0.75]]), {"prediction": ["yes"]})
    >>> path.read_text().splitlines()
    ['image,no,yes,prediction', 'a.png,0.250000,0.750000,yes']
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", *class_names, *(extra or {})])
    for i, key in enumerate(keys):
        writer.writerow([key, *(f"{p:.6f}" for p in probs[i]), *(v[i] for v in (extra or {}).values())])
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
