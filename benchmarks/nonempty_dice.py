"""Dice of a finished segmentation benchmark on the test cases whose true mask has foreground.

The benchmark's Dice counts an empty prediction on an empty mask as 1.0; on sets where many test cases have
no foreground (brats6 slices without tumour), that floor hides whether a model finds anything. This reads the
per-case ``summary.json`` files the benchmark left in its work folder and averages over non-empty cases only,
and, apart, over the empty ones (where a model scores 1 if it predicts nothing and 0 for any false-positive pixel).

    python benchmarks/nonempty_dice.py --config configs/benchmarks/brats6.yaml
    python benchmarks/nonempty_dice.py --config configs/benchmarks/busi.yaml \
        --work runs/benchmarks/deployment/busi/full --out benchmarks/results/deployment_busi_by_case_kind.json
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


def empty_cases(data: Path, cases_file: Path, channels) -> tuple[set[str], int]:
    """The cases of `cases_file` whose true mask has no foreground, and the number of cases."""
    cases = discover_cases(data / "images", data / "masks", str(cases_file), channels)
    return {c.name for c in cases if not np.any(read_mask(c.mask))}, len(cases)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--work", help="the benchmark's work folder (default: runs/benchmarks/<dataset>)")
    parser.add_argument("--out", help="write the table here as JSON (a results file)")
    args = parser.parse_args(argv)
    cfg = load_config(Path(args.config), quick=False)
    work = Path(args.work or ROOT / "runs" / "benchmarks" / cfg["name"])
    data = work / "prepared" if cfg.get("prepare") else dataset_folder(cfg["data"], "nonempty_dice")
    table: dict[str, dict[str, list[float]]] = {"nonempty": {}, "empty": {}}
    counts, surveyed = {}, {}  # surveyed: case list text -> its empty cases, so each list's masks are read once
    for seed_dir in sorted(work.glob("seed*")):
        # the case lists: the seed's own (deployment.py) or the benchmark's
        cases_file = next(p for p in (seed_dir / "cases" / "test.txt", work / "cases" / "test.txt") if p.is_file())
        listed = cases_file.read_text(encoding="utf-8")
        if listed not in surveyed:
            surveyed[listed] = empty_cases(data, cases_file, cfg.get("channels"))
        empty, n = surveyed[listed]
        counts[seed_dir.name] = {"cases": n, "empty": len(empty)}
        for summary in sorted(seed_dir.glob("eval_*/summary.json")):
            if summary.parent.name.startswith("eval_labels"):
                continue  # label sets are scored on the transferal split
            per_case = json.loads(summary.read_text(encoding="utf-8"))["per_case"]
            name = summary.parent.name[len("eval_"):]
            for part, scores in (("nonempty", [c["dice"] for c in per_case if c["case"] not in empty]),
                                 ("empty", [c["dice"] for c in per_case if c["case"] in empty])):
                if scores:
                    table[part].setdefault(name, []).append(float(np.mean(scores)))
    for seed, count in counts.items():
        print(f"{seed}: {count['empty']} of {count['cases']} test cases have an empty mask")
    for part, title in (("nonempty", "cases with foreground"), ("empty", "empty masks (1: nothing predicted)")):
        print(f"Dice over the {title}:")
        for name, values in table[part].items():
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"  {name:60s} {statistics.fmean(values):.4f} ± {std:.4f}  ({len(values)} seeds)")
    if args.out:
        means = {part: {name: statistics.fmean(v) for name, v in rows.items()} for part, rows in table.items()}
        command = " ".join(["python", "benchmarks/nonempty_dice.py", *(sys.argv[1:] if argv is None else argv)])
        Path(args.out).write_text(json.dumps({"command": command, "test_cases": counts, "per_seed": table,
                                              "mean": means}, indent=1) + "\n", encoding="utf-8")
    return table


if __name__ == "__main__":
    main()
