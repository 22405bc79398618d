"""``summary.json``, what ``nakt evaluate`` writes: ``{"mean": {...}, "per_case": [{"case": ...}, ...], ...}``
(a contract benchmarks and users read), stamped with its format and the nakt version."""

from __future__ import annotations

from pathlib import Path

from nakt.io.rundir import write_json
from nakt.version import __version__

__all__ = ["SUMMARY", "SUMMARY_FORMAT", "write_summary"]

SUMMARY = "summary.json"
SUMMARY_FORMAT = "nakt.summary/1"


def write_summary(out: str | Path, scores: dict) -> dict:
    """Write ``out/summary.json`` (atomically) from `scores`; returns what was written."""
    summary = {"format": SUMMARY_FORMAT, "nakt_version": __version__, **scores}
    write_json(Path(out) / SUMMARY, summary)
    return summary

