"""Partial teachers on brats6: two teachers that each know some tumour sub-regions, in their own label codes, fused
by class name into one label set; one student learns the union.

brats6 as 2D axial slices (`segmentation_transfer.prepare_brats_slices`: FLAIR + T1c, labels 1 necrosis, 2 edema,
3 non-enhancing tumour, 4 enhancing tumour). Per seed:
- teacher A (smp Unet/resnet18) learns necrosis + edema from `teacher_train` (the other classes are background in
  its masks, as in a dataset that never annotated them), values 1/2;
- teacher B (smp FPN/resnet34) learns edema + non-enhancing + enhancing, coded 20/30/40;
- `nakt label` fuses them on `teacher_train` + `transferal` (the teachers' own images and the pool: 114 slices,
  as partial annotations are merged in practice), matching classes by the names the specs declare
  (``?labels=0:background,20:edema,...``): edema is fused over both teachers, every other class over the one
  that knows it;
- the union student (smp Unet/resnet34, one network) learns from that label set alone, and a control of the
  same architecture from the same slices' full true masks.
Every model is scored on `test` per class, as Dice pooled over the test slices (a teacher on the classes it knows).

    python benchmarks/partial_teachers.py            # 3 seeds, 128 px, 20 epochs -> results/partial_teachers.*
    python benchmarks/partial_teachers.py --quick    # 1 seed, 64 px, 3 epochs -> results/quick/partial_teachers.*
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segmentation_transfer import prepare_brats_slices  # noqa: E402

import nakt  # noqa: E402
from nakt.machine import this_machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "brats6"
CLASSES = {"necrosis": 1, "edema": 2, "non-enhancing": 3, "enhancing": 4}  # the true masks' values
TEACHERS = {  # name -> (architecture, {class: the value this teacher's masks use})
    "A": ("smp:Unet/resnet18", {"necrosis": 1, "edema": 2}),
    "B": ("smp:FPN/resnet34", {"edema": 20, "non-enhancing": 30, "enhancing": 40}),
}
STUDENT = "smp:Unet/resnet34"
CHANNELS = ["flair*", "t1c*"]


def partial_masks(prepared: Path, dest: Path, codes: dict[str, int]) -> Path:
    """The true masks with only the classes in `codes`, recoded to its values (every other class background)."""
    if dest.is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for path in sorted((prepared / "masks").glob("*.png")):
        truth = np.asarray(Image.open(path))
        mask = np.zeros_like(truth)
        for name, value in codes.items():
            mask[truth == CLASSES[name]] = value
        Image.fromarray(mask).save(tmp / path.name)
    tmp.rename(dest)
    return dest


def spec_with_names(run: Path, codes: dict[str, int]) -> str:
    """A run as a teacher whose classes are named: ``RUN?labels=0:background,1:necrosis,...``."""
    return f"{run}?labels=" + ",".join(["0:background"] + [f"{v}:{n}" for n, v in codes.items()])


def pooled_dice(pred_dir: Path, truth_dir: Path, cases: list[str], values: dict[str, int]) -> dict[str, float]:
    """Per class name, Dice over all `cases` pooled (predicted value `values[name]` against the true class)."""
    inter, total = dict.fromkeys(values, 0), dict.fromkeys(values, 0)
    for case in cases:
        pred = np.asarray(Image.open(pred_dir / f"{case}.png"))
        truth = np.asarray(Image.open(truth_dir / f"{case}.png"))
        for name, value in values.items():
            p, t = pred == value, truth == CLASSES[name]
            inter[name] += int((p & t).sum())
            total[name] += int(p.sum() + t.sum())
    return {name: 2 * inter[name] / total[name] if total[name] else 1.0 for name in values}


def run_seed(seed: int, data: Path, work: Path, train: dict, student_lr: float) -> dict:
    splits = data / "splits.json"
    test = json.loads(splits.read_text())["test"]
    common = dict(images=str(data / "images"), channels=CHANNELS, progress=False, seed=seed, overwrite=True, **train)
    scores, specs = {}, []
    for name, (model, codes) in TEACHERS.items():
        masks = partial_masks(data, work / f"masks_{name}", codes)
        run = nakt.train(model=model, masks=str(masks), cases=f"{splits}:teacher_train",
                         val_images=str(data / "images"), val_masks=str(masks), val_cases=f"{splits}:teacher_val",
                         out=str(work / f"s{seed}" / name), **common)
        specs.append(spec_with_names(run, codes))
        pred = nakt.predict(model=str(run), images=str(data / "images"), cases=f"{splits}:test", channels=CHANNELS,
                            out=str(work / f"s{seed}" / f"pred_{name}"), overwrite=True, progress=False)
        scores[f"teacher {name}"] = pooled_dice(pred, data / "masks", test, codes)
    pool = work / "pool.txt"  # teacher_train + transferal: the slices the union student learns from
    names = json.loads(splits.read_text())
    pool.write_text("\n".join(names["teacher_train"] + names["transferal"]) + "\n")
    labels = nakt.label(teacher=specs, images=str(data / "images"), cases=str(pool), channels=CHANNELS,
                        out=str(work / f"s{seed}" / "union_labels"), overwrite=True, progress=False)
    manifest = json.loads((labels / "manifest.json").read_text())
    union_values = dict(zip(manifest["class_names"][1:], manifest["label_values"][1:]))
    students = {"union student (teachers' labels)": (str(labels), union_values),
                "control student (full true masks)": (str(data / "masks"), CLASSES)}
    for row, (masks, values) in students.items():
        out = work / f"s{seed}" / ("union_student" if "union" in row else "control_student")
        run = nakt.train(model=STUDENT, masks=masks, cases=str(pool), out=str(out), val_fraction=0,
                         **{**common, "lr": student_lr})
        pred = nakt.predict(model=str(run), images=str(data / "images"), cases=f"{splits}:test", channels=CHANNELS,
                            out=str(out.with_name(out.name + "_pred")), overwrite=True, progress=False)
        scores[row] = pooled_dice(pred, data / "masks", test, values)
    return {"scores": scores, "label_mapping": manifest["label_mapping"], "union_values": union_values}


def summarise(per_seed: dict) -> dict:
    """Per class: each row's mean Dice over seeds, the best knowing teacher, and the union student's ratio."""
    rows = list(next(iter(per_seed.values()))["scores"])
    mean = {row: {c: statistics.fmean(s["scores"][row][c] for s in per_seed.values())
                  for c in next(iter(per_seed.values()))["scores"][row]} for row in rows}
    union = "union student (teachers' labels)"
    per_class = {}
    for c in CLASSES:
        knowing = {f"teacher {t}": mean[f"teacher {t}"][c] for t, (_, codes) in TEACHERS.items() if c in codes}
        best = max(knowing, key=knowing.get)
        per_class[c] = {"best_teacher": best, "best_teacher_dice": knowing[best], "union_dice": mean[union][c],
                        "ratio": mean[union][c] / knowing[best] if knowing[best] else None,
                        "control_dice": mean["control student (full true masks)"][c]}
    return {"mean": mean, "per_class": per_class,
            "target_met": all(p["ratio"] is not None and p["ratio"] >= 0.95 for p in per_class.values())}


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [f"# Partial teachers on brats6 ({result['mode']} mode, seeds {result['config']['seeds']})", "",
             f"Command: `{result['command']}`  ", "",
             f"| class | teacher A ({TEACHERS['A'][0]}) | teacher B ({TEACHERS['B'][0]}) | union student ({STUDENT}) | "
             "union / best knowing teacher | control student (full true masks) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for c, p in s["per_class"].items():
        a, b = (s["mean"][f"teacher {t}"].get(c) for t in TEACHERS)
        cell = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        ratio = "-" if p["ratio"] is None else f"{p['ratio']:.2f}x"
        lines.append(f"| {c} | {cell(a)} | {cell(b)} | {p['union_dice']:.4f} | {ratio} | {p['control_dice']:.4f} |")
    lines += ["", f"Target (union student >= 0.95x the best teacher that knows each class, mean of the seeds): "
              f"{'met' if s['target_met'] else '**not met**'}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 64 px, 3 epochs")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--work", default=str(ROOT / "runs" / "benchmarks" / "partial_teachers"))
    parser.add_argument("--out", help="results folder (default benchmarks/results, or its quick/ in quick mode)")
    args = parser.parse_args(argv)
    source = Path(args.data)
    if not source.is_dir():
        sys.exit(f"partial_teachers: {source}: dataset folder not found")
    work = Path(args.work) / ("quick" if args.quick else "full")
    data = prepare_brats_slices(source, work / "prepared")
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    train = {"size": [args.size or (64 if args.quick else 128)], "epochs": args.epochs or (3 if args.quick else 20),
             "batch_size": 8, "lr": 1e-3}
    command = " ".join(["python", "benchmarks/partial_teachers.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.time()
    per_seed = {}
    for seed in seeds:
        per_seed[str(seed)] = run_seed(seed, data, work, train, student_lr=1e-3)
        print(f"[seed {seed}] " + json.dumps(per_seed[str(seed)]["scores"]), flush=True)
    result = {"mode": "quick" if args.quick else "full", "command": command,
              "config": {**train, "seeds": seeds, "teachers": TEACHERS, "student": STUDENT},
              "machine": this_machine().to_json(), "per_seed": per_seed, "summary": summarise(per_seed),
              "total_wall_s": time.time() - started}
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    (out / "partial_teachers.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "partial_teachers.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
