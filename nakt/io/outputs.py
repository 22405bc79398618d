"""Output folders and files: nakt never deletes or overwrites what it did not write.

Every verb that writes a folder claims it first (`claim_output`). A folder that does not exist or is empty is
nakt's to fill. One that holds nakt's own output of the same kind, recognised by its marker file's ``"format"``
field, is replaced only on request (``--overwrite``), and then only the entries nakt writes there; anything
else in the folder stays. Any other folder is refused with a one-line error.

Files appear whole (`atomic_path`) and with the permissions the process umask gives (0644 under umask 022),
so others in a lab can read run directories and label sets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nakt.errors import NaktError

__all__ = [
    "DEMO",
    "EVALUATION",
    "LABEL_SET",
    "PREDICTIONS",
    "RUN",
    "SUBSET_RUNS",
    "OutputKind",
    "atomic_path",
    "checksum",
    "claim_output",
    "fresh_output",
    "holds_output",
]


@dataclass(frozen=True)
class OutputKind:
    """A kind of folder nakt writes: its marker file, the marker's format prefix, and the entries (globs) that
    nakt writes there, which ``--overwrite`` may remove; `per_case` entries are expanded with the case names
    the marker lists under ``"cases"`` (for outputs whose files are named after the cases)."""

    name: str
    marker: str
    format_prefix: str
    owned: tuple[str, ...]
    per_case: tuple[str, ...] = ()


RUN = OutputKind("run directory", "config.json", "nakt.run/",
                 ("config.json", "model.safetensors", "metrics.json", "training_state.pt", "prepared"))
SUBSET_RUNS = OutputKind("set of subset runs", "subsets.json", "nakt.subsets/",
                         ("subsets.json", "subset_*.txt", "subset_*"))
LABEL_SET = OutputKind("label set", "manifest.json", "nakt.labelset/",
                       ("manifest.json", "masks", "probs", "records", "labels.csv"))
PREDICTIONS = OutputKind("predictions folder", "predictions.json", "nakt.predictions/",
                         ("predictions.json", "predictions.csv"),
                         ("{case}.png", "{case}.nii.gz", "{case}.mha", "{case}.mhd", "{case}.raw", "{case}.nrrd",
                          "{case}.nhdr", "probs/{case}.npz"))
EVALUATION = OutputKind("evaluation folder", "summary.json", "nakt.summary/", ("summary.json",))
DEMO = OutputKind("demo folder", "demo.json", "nakt.demo/",
                  ("demo.json", "data", "teacher1", "teacher2", "labels", "student", "eval"))


def _marker(folder: Path, kind: OutputKind) -> dict | None:
    try:
        data = json.loads((folder / kind.marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def holds_output(folder: str | Path, kind: OutputKind) -> bool:
    """True when `folder` holds nakt's output of `kind` (its marker file with the kind's format)."""
    marker = _marker(Path(folder), kind)
    return marker is not None and str(marker.get("format", "")).startswith(kind.format_prefix)


def _remove_owned(folder: Path, kind: OutputKind) -> None:
    cases = (_marker(folder, kind) or {}).get("cases", [])
    per_case = [p.format(case=c) for c in cases for p in kind.per_case] if isinstance(cases, list) else []
    for pattern in [*per_case, *kind.owned]:
        for entry in sorted(folder.glob(pattern)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)


def claim_output(out: str | Path, kind: OutputKind, overwrite: bool = False, resume: bool = False,
                 flag: str = "--out") -> bool:
    """Make `out` ready for `kind`; returns True when it already holds such an output and `resume` keeps it.

    Refused with a `NaktError`: a file in the way, a non-empty folder that is not nakt's output of this kind,
    and (without `overwrite` or `resume`) nakt's own output of this kind.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NaktError(out, f"{flag} is a file, not a folder", "choose a new folder")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return False
    if not holds_output(out, kind):
        raise NaktError(out, f"{flag} exists, is not empty and is not a nakt {kind.name} (no {kind.marker})",
                        f"nakt never writes into folders it did not make: choose a new or empty {flag}")
    if resume:
        return True
    if not overwrite:
        raise NaktError(out, f"holds a nakt {kind.name} already",
                        f"choose a new {flag}, or pass --overwrite to replace it")
    _remove_owned(out, kind)
    return False


@contextmanager
def fresh_output(out: str | Path, kind: OutputKind, overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """`claim_output` for a verb that writes its folder in one go: a folder this call created is removed again
    if the block fails before anything was written into it."""
    out = Path(out)
    existed = out.exists()
    claim_output(out, kind, overwrite, flag=flag)
    try:
        yield out
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def checksum(path: str | Path) -> str:
    """SHA-256 of a file's bytes; of a folder, of its file listing with sizes (reading every file of a model
    folder or a folder of predictions would cost as much as using them)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path)}\t{file.stat().st_size}\n".encode())
        return digest.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


class atomic_path:
    """Context manager yielding a temporary path beside `path`, moved onto it only if the block succeeds.

    The file gets the permissions of a plain ``open()`` (0666 less the umask), not mkstemp's private 0600.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=self.path.name, dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                os.chmod(self.tmp, 0o666 & ~_umask())
                os.replace(self.tmp, self.path)
        finally:  # a failed block or move (a full disk) leaves no temporary file behind
            self.tmp.unlink(missing_ok=True)
