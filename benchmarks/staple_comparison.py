"""nakt's STAPLE (binary STAPLE one foreground class against the rest, `nakt.fusion.staple_estimates`) against
SimpleITK's MultiLabelSTAPLE, on multi-class label maps whose truth is known.

Truth: the tumour sub-region masks of ../shared/data/brats6 (labels 0-4, six subjects, real anatomy). Teachers:
the truth corrupted the way segmentation networks err, differently per teacher and seed: each class grown or
shrunk at its border by 1-2 voxels, some of its connected components dropped or confused with another class,
and one weak teacher that misses a class entirely. Each rule fuses the K = 3 teachers' hard labels;
its labels are scored by the mean foreground Dice against the truth (over the classes present in the truth),
and timed on this machine. The plain majority vote (`fuse_vote`) is the reference.

    python benchmarks/staple_comparison.py [--data ../shared/data/brats6] [--seeds 3]
        [--out benchmarks/results/staple_comparison.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nakt.fusion import fuse_vote, staple_estimates
from nakt.metrics import case_scores

ROOT = Path(__file__).resolve().parents[1]


def corrupt(truth: np.ndarray, classes: list[int], rng: np.random.Generator, weak: bool) -> np.ndarray:
    """A teacher's labels: each class grown or shrunk at its border by 1-2 voxels, each of its connected
    components dropped (to background) or given another class with probability 0.15; a `weak` teacher also
    misses one class entirely."""
    labels = truth.copy()
    for c in classes:
        mask = truth == c
        steps = int(rng.integers(1, 3))
        if rng.random() < 0.5:
            changed = ndimage.binary_dilation(mask, iterations=steps) & (labels == 0)
            labels[changed] = c
        else:
            labels[mask & ~ndimage.binary_erosion(mask, iterations=steps)] = 0
        components, count = ndimage.label(mask)
        for k in np.flatnonzero(rng.random(count) < 0.15) + 1:
            labels[components == k] = rng.choice([0, *[o for o in classes if o != c]])
    if weak:
        labels[labels == rng.choice(classes)] = 0  # e.g. a model trained without that sub-region
    return labels


def one_hot(hard: np.ndarray, values: list[int]) -> np.ndarray:
    """``[K, *spatial]`` label maps -> ``[K, C, *spatial]`` one-hot probabilities over `values`."""
    return np.stack([(hard == v) for v in values], axis=1).astype(np.float32)


def multilabel_staple(hard: np.ndarray, values: list[int]) -> np.ndarray:
    """SimpleITK's MultiLabelSTAPLE on K label maps; undecided pixels take the vote (nakt's tie rule)."""
    f = sitk.MultiLabelSTAPLEImageFilter()
    undecided = 255
    f.SetLabelForUndecidedPixels(undecided)
    out = sitk.GetArrayFromImage(f.Execute([sitk.GetImageFromArray(t.astype(np.uint8)) for t in hard]))
    vote = np.asarray(values)[fuse_vote(one_hot(hard, values)).argmax(0)]
    return np.where(out == undecided, vote, out)


# each rule: one-hot teachers [K, C, *spatial] -> class indices; MultiLabelSTAPLE works on the label maps themselves
RULES = {"vote": lambda probs: fuse_vote(probs).argmax(0),
         "nakt_staple": lambda probs: staple_estimates(probs)[0].argmax(0), "multilabel_staple": None}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def dice(labels: np.ndarray, truth: np.ndarray, values: list[int]) -> float:
    """Mean foreground Dice as `nakt evaluate` scores it (label values mapped to class indices)."""
    return case_scores(np.searchsorted(values, labels), np.searchsorted(values, truth), len(values), hd95=False)["dice"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "brats6"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "staple_comparison.json"))
    args = parser.parse_args()
    import nibabel as nib

    masks = sorted(Path(args.data).glob("*/*/OTMultiClass*.nii*"))
    if not masks:
        raise SystemExit(f"no OTMultiClass masks under {args.data}")
    rows = []
    for path in masks:
        truth = np.asarray(nib.load(path).dataobj).astype(np.uint8)
        tumour = ndimage.find_objects((truth > 0).astype(np.uint8))[0]
        box = tuple(slice(max(s.start - 8, 0), s.stop + 8) for s in tumour)
        truth = truth[box]  # the tumour's neighbourhood: what all rules see alike, at a fraction of the cost
        values = sorted(int(v) for v in np.unique(truth))
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            hard = np.stack([corrupt(truth, values[1:], rng, weak=k == 2) for k in range(3)])
            probs = one_hot(hard, values)
            row = {"case": path.parent.name, "seed": seed, "voxels": int(truth.size), "classes": values}
            for name, rule in RULES.items():
                start = time.perf_counter()
                labels = multilabel_staple(hard, values) if rule is None else np.asarray(values)[rule(probs)]
                row[f"{name}_seconds"] = round(time.perf_counter() - start, 3)
                row[f"{name}_dice"] = round(dice(labels, truth, values), 4)
            row["teacher_dice"] = [round(dice(t, truth, values), 4) for t in hard]
            print(json.dumps(row))
            rows.append(row)
    rules = ("vote", "nakt_staple", "multilabel_staple")
    summary = {r: {"dice": round(float(np.mean([x[f"{r}_dice"] for x in rows])), 4),
                   "seconds": round(float(np.mean([x[f"{r}_seconds"] for x in rows])), 3)} for r in rules}
    summary["best_teacher_dice"] = round(float(np.mean([max(x["teacher_dice"]) for x in rows])), 4)
    summary["nakt_minus_multilabel"] = round(summary["nakt_staple"]["dice"] - summary["multilabel_staple"]["dice"], 4)
    summary["nakt_better_cases"] = sum(x["nakt_staple_dice"] > x["multilabel_staple_dice"] for x in rows)
    summary["cases"] = len(rows)
    result = {"command": "python benchmarks/staple_comparison.py", "summary": summary, "rows": rows,
              "cpu": cpu_model(), "cores": os.cpu_count()}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
