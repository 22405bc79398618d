"""Dice of a finished segmentation benchmark on the test cases whose true mask has foreground.

The benchmark's Dice counts an empty prediction on an empty mask as 1.0; on sets where many test cases have
no foreground (brats6 slices without tumour), that floor hides whether a model finds anything. This reads the
per-case ``summary.json`` files the benchmark left in its work folder and averages over non-empty cases only.

    python benchmarks/nonempty_dice.py --config configs/benchmarks/brats6.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segmentation_transfer import ROOT, dataset_folder, load_config  # noqa: E402  (the sibling benchmark script)

from nakt.io.dataset import discover_cases  # noqa: E402
from nakt.io.images import read_mask  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--work", help="the benchmark's work folder (default: runs/benchmarks/<dataset>)")
    args = parser.parse_args(argv)
    cfg = load_config(Path(args.config), quick=False)
    work = Path(args.work or ROOT / "runs" / "benchmarks" / cfg["name"])
    data = work / "prepared" if cfg.get("prepare") else dataset_folder(cfg["data"], "nonempty_dice")
    cases = discover_cases(data / "images", data / "masks", str(work / "cases" / "test.txt"), cfg.get("channels"))
    empty = {c.name for c in cases if not np.any(read_mask(c.mask))}
    print(f"{len(empty)} of {len(cases)} test cases have an empty mask; Dice below is over the other "
          f"{len(cases) - len(empty)}")
    table: dict[str, list[float]] = {}
    for seed_dir in sorted(work.glob("seed*")):
        for summary in sorted(seed_dir.glob("eval_*/summary.json")):
            if summary.parent.name.startswith("eval_labels_"):
                continue  # label sets are scored on the transferal split
            per_case = json.loads(summary.read_text(encoding="utf-8"))["per_case"]
            scores = [c["dice"] for c in per_case if c["case"] not in empty]
            table.setdefault(summary.parent.name[len("eval_"):], []).append(float(np.mean(scores)))
    for name, values in table.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:60s} {statistics.fmean(values):.4f} ± {std:.4f}  ({len(values)} seeds)")
    return table


if __name__ == "__main__":
    main()
