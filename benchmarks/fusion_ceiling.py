"""How good can any weighted fusion of these teachers' labels be? A bound, found with the truth, for fusion rules
that weight teachers without it.

Given single-teacher label sets of the same cases (``nakt label`` with one teacher each; their probabilities are
kept) and the true masks, every weight vector ``w`` on a grid over the simplex (``--step``) fuses the teachers as
``argmax(sum_k w_k p_k)`` and is scored as ``nakt evaluate`` scores a label set (foreground Dice per case, mean over
cases; ``--roi`` as there); every rule of ``nakt.fusion.FUSIONS`` (none of them sees the truth) is scored
beside them. No rule that sets teacher weights without the truth (STAPLE, confidence, validation Dice) can beat
the best grid weights by more than the grid's resolution allows: if those are no better than the best teacher
alone, no weighting of these teachers gives better labels.
Probabilities are read as label sets store them (steps of 1/256), so a teacher alone can score about 1e-4 off
its label set's masks (a pixel at exactly 0.5 goes to the background here).
Cases are read one at a time (memory does not grow with their number).

    python benchmarks/fusion_ceiling.py --labels runs/benchmarks/cxr_lungs/seed0/labels_smp_* \\
        runs/benchmarks/cxr_lungs/seed0/labels_monai_UNet --masks ../shared/data/cxr_lungs/masks \\
        --cases runs/benchmarks/cxr_lungs/cases/transferal.txt --out benchmarks/results/cxr_lungs_fusion_ceiling.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from nakt.errors import NaktError
from nakt.fusion import FUSIONS
from nakt.io import labelset
from nakt.io.dataset import discover_cases
from nakt.io.images import read_image, read_mask
from nakt.metrics import case_scores
from nakt.preprocess import encode_labels
from nakt.train.data import read_label_map


def simplex_grid(teachers: int, step: float) -> list[tuple[float, ...]]:
    """Every weight vector of `teachers` non-negative multiples of `step` that sum to 1.

    >>> simplex_grid(2, 0.5)
    [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    """
    n = round(1 / step)
    return [tuple(c / n for c in counts) for counts in itertools.product(range(n + 1), repeat=teachers)
            if sum(counts) == n]


def fusion_ceiling(label_sets: list[str], masks: str, cases: str | None = None, roi: str | None = None,
                   step: float = 0.1) -> dict:
    """Mean Dice against `masks` of every grid weighting of the label sets' probabilities, and of their vote.

    Returns ``{"teachers": [...], "single": [dice per teacher], "rules": {fusion rule: dice}, "vote": dice,
    "best": {"weights", "dice"}, "grid": [{"weights", "dice"}, ...], "cases": n}``."""
    manifests = [labelset.read_manifest(path) for path in label_sets]
    values = manifests[0]["label_values"]
    if any(m["label_values"] != values for m in manifests):
        raise NaktError(label_sets[0], "the label sets hold different label values",
                        "fuse label sets of the same task")
    images, orientation = manifests[0]["images"], manifests[0].get("orientation", "RAS")
    found = discover_cases(images, masks, cases, require_masks=True)
    rois = {c.name: c.mask for c in discover_cases(images, roi, cases, require_masks=True)} if roi else {}
    grid = simplex_grid(len(label_sets), step)
    totals, single, rules = np.zeros(len(grid)), np.zeros(len(label_sets)), dict.fromkeys(FUSIONS, 0.0)
    for case in found:
        probs = []
        for path in label_sets:
            p = labelset.read_probs(path, case.name)
            if p is None:
                raise NaktError(path, f"no probabilities for case {case.name}", "label with one teacher each")
            probs.append(p)
        teacher_probs = np.stack(probs)  # [K, C, *spatial]
        image = read_image(case.images, orientation=orientation)
        truth = encode_labels(read_label_map(case.mask, like=image), values, case.mask)
        inside = read_mask(rois[case.name], like=image) != 0 if rois else np.ones(truth.shape, bool)
        truth = np.where(inside, truth, 0)

        def dice(pred: np.ndarray) -> float:  # as `nakt evaluate` scores a case; outside the ROI: background
            return case_scores(np.where(inside, pred, 0), truth, len(values), hd95=False)["dice"]  # noqa: B023

        for i, weights in enumerate(grid):
            totals[i] += dice(np.tensordot(np.asarray(weights), teacher_probs, axes=1).argmax(0))
        single += [dice(p.argmax(0)) for p in teacher_probs]
        for name, rule in FUSIONS.items():
            rules[name] += dice(rule(teacher_probs).argmax(0))
    n = len(found)
    best = int(np.argmax(totals))
    return {"teachers": [m["teachers"][0]["spec"] for m in manifests], "label_sets": list(map(str, label_sets)),
            "single": (single / n).tolist(), "rules": {name: total / n for name, total in rules.items()},
            "vote": rules["vote"] / n,
            "best": {"weights": grid[best], "dice": totals[best] / n},
            "grid": [{"weights": w, "dice": t / n} for w, t in zip(grid, totals)], "cases": n, "step": step}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", nargs="+", required=True, help="single-teacher label sets of the same cases")
    parser.add_argument("--masks", required=True, help="the true masks")
    parser.add_argument("--cases", help="case list (default: every case of the label sets' images with a mask)")
    parser.add_argument("--roi", help="region masks: pixels outside count as background (as nakt evaluate)")
    parser.add_argument("--step", type=float, default=0.1, help="grid step of the weights (default 0.1)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.step <= 0.5 or abs(round(1 / args.step) * args.step - 1) > 1e-9:
        sys.exit(f"fusion_ceiling: --step {args.step}: must divide 1 (0.5, 0.25, 0.1, 0.05, ...)")
    try:
        result = fusion_ceiling(args.labels, args.masks, args.cases, args.roi, args.step)
    except NaktError as exc:
        sys.exit(f"fusion_ceiling: {exc}")
    result["command"] = " ".join(["python", "benchmarks/fusion_ceiling.py", *(sys.argv[1:] if argv is None else argv)])
    for spec, score in zip(result["teachers"], result["single"]):
        print(f"{score:.4f}  {spec} alone")
    for name, score in result["rules"].items():
        print(f"{score:.4f}  fused {name}")
    print(f"{result['best']['dice']:.4f}  best grid weights {result['best']['weights']} ({result['cases']} cases)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
