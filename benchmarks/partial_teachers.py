"""Partial teachers on brats6: two teachers that each know some tumour sub-regions, in their own label codes, fused
by class name into one label set; one student learns the union. Beside it, students trained on partially
annotated true masks, with and without the marginal loss.

brats6 as 2D axial slices (`segmentation_transfer.prepare_brats_slices`: FLAIR + T1c, labels 1 necrosis, 2 edema,
3 non-enhancing tumour, 4 enhancing tumour), in one of three class schemes (`--scheme`):
- ``brats17`` (default): the BraTS 2017-2020 labels, necrosis and non-enhancing tumour merged into one tumour
  core class (NCR/NET), with edema and enhancing tumour; teacher A knows core + edema (values 1/2), teacher B
  edema + enhancing (20/40);
- ``four``: the four labels as stored; teacher A knows necrosis + edema (1/2), teacher B edema + non-enhancing +
  enhancing (20/30/40).
- ``tc_edema``: two classes, the tumour core as BraTS scores it (necrosis, non-enhancing and enhancing tumour)
  and edema; teacher A knows only the core (value 1), teacher B only edema (20): neither knows the other's class,
  each calls it background.
Per seed:
- teacher A (smp Unet/resnet18) and teacher B (smp FPN/resnet34) learn their classes from `teacher_train` (the
  other classes are background in their masks, as in a dataset that never annotated them), keeping the epoch
  that scores best on `teacher_val` or (``--teacher-epoch last``) their last one, as the students do;
- `nakt label` fuses them on `teacher_train` + `transferal` (the teachers' own images and the pool, as partial
  annotations are merged in practice; ``--pool all`` adds `teacher_val` and `finetune`, every slice of the four
  subjects that are not test subjects), matching classes by the names the specs declare
  (``?labels=0:background,20:edema,...``): edema is fused over both teachers, every other class over the one
  that knows it;
- the union student (smp Unet/resnet34, one network) learns from that label set alone, and a control of the
  same architecture from the same slices' full true masks;
- partially annotated true masks: the same slices, alternately annotated with A's classes or B's (the others
  stored as background, in one value space), learnt by the same architecture with ``--annotated-classes`` (the
  marginal loss) and without it (unannotated = background).
Every model is scored on `test` per class, as Dice pooled over the test slices (a teacher on the classes it knows).

    python benchmarks/partial_teachers.py            # 3 seeds, 128 px, 20 epochs -> results/partial_teachers.*
    python benchmarks/partial_teachers.py --scheme four   # -> results/partial_teachers_four.*
    python benchmarks/partial_teachers.py --quick    # 1 seed, 64 px, 3 epochs -> results/quick/partial_teachers.*
    python benchmarks/partial_teachers.py --batch-dice   # every network with --batch-dice -> *_batch_dice.*
    python benchmarks/partial_teachers.py --teacher-epoch last  # teachers keep their last epoch -> *_last_epoch.*
    python benchmarks/partial_teachers.py --teacher-epoch last --reuse --union-fusion mean --union-option epochs=40
        # a union-student variant on the same teachers (runs already in the work folder are kept)
        # -> *_last_epoch_union_mean_epochs40.*
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segmentation_transfer import prepare_brats_slices  # noqa: E402

import nakt  # noqa: E402
from nakt.machine import this_machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "brats6"
SCHEMES = {  # scheme -> (class -> the true masks' values, {teacher: (architecture, {class: its own value})})
    "brats17": ({"core": (1, 3), "edema": (2,), "enhancing": (4,)}, {
        "A": ("smp:Unet/resnet18", {"core": 1, "edema": 2}),
        "B": ("smp:FPN/resnet34", {"edema": 20, "enhancing": 40})}),
    "four": ({"necrosis": (1,), "edema": (2,), "non-enhancing": (3,), "enhancing": (4,)}, {
        "A": ("smp:Unet/resnet18", {"necrosis": 1, "edema": 2}),
        "B": ("smp:FPN/resnet34", {"edema": 20, "non-enhancing": 30, "enhancing": 40})}),
    "tc_edema": ({"tumour_core": (1, 3, 4), "edema": (2,)}, {
        "A": ("smp:Unet/resnet18", {"tumour_core": 1}),
        "B": ("smp:FPN/resnet34", {"edema": 20})}),
}
STUDENT = "smp:Unet/resnet34"
CHANNELS = ["flair*", "t1c*"]


def partial_masks(prepared: Path, dest: Path, codes: dict[str, int], classes: dict[str, tuple]) -> Path:
    """The true masks with only the classes in `codes` (true values per class in `classes`), recoded to its
    values (every other class background)."""
    if dest.is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for path in sorted((prepared / "masks").glob("*.png")):
        truth = np.asarray(Image.open(path))
        mask = np.zeros_like(truth)
        for name, value in codes.items():
            mask[np.isin(truth, classes[name])] = value
        Image.fromarray(mask).save(tmp / path.name)
    tmp.rename(dest)
    return dest


def partially_annotated(prepared: Path, dest: Path, cases: list[str], scheme: str) -> Path:
    """The true masks of `cases` in one value space (each class its first true value), alternately annotated
    with teacher A's classes or B's (the others background), and ``dest.csv`` listing each case's annotated
    values for ``--annotated-classes``. Returns the CSV."""
    classes, teachers = SCHEMES[scheme]
    table = dest.with_suffix(".csv")
    if table.is_file():
        return table
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    rows = ["case,classes"]
    for i, case in enumerate(cases):
        known = list(teachers["A" if i % 2 == 0 else "B"][1])
        truth = np.asarray(Image.open(prepared / "masks" / f"{case}.png"))
        mask = np.zeros_like(truth)
        for name in known:
            mask[np.isin(truth, classes[name])] = classes[name][0]
        Image.fromarray(mask).save(tmp / f"{case}.png")
        rows.append(f"{case},{';'.join(str(classes[name][0]) for name in known)}")
    tmp.rename(dest)
    table.write_text("\n".join(rows) + "\n")
    return table


def spec_with_names(run: Path, codes: dict[str, int]) -> str:
    """A run as a teacher whose classes are named: ``RUN?labels=0:background,1:necrosis,...``."""
    return f"{run}?labels=" + ",".join(["0:background"] + [f"{v}:{n}" for n, v in codes.items()])


def pooled_dice(pred_dir: Path, truth_dir: Path, cases: list[str], values: dict[str, int],
                classes: dict[str, tuple]) -> dict[str, float]:
    """Per class name, Dice over all `cases` pooled (predicted value `values[name]` against the true values
    `classes[name]`)."""
    inter, total = dict.fromkeys(values, 0), dict.fromkeys(values, 0)
    for case in cases:
        pred = np.asarray(Image.open(pred_dir / f"{case}.png"))
        truth = np.asarray(Image.open(truth_dir / f"{case}.png"))
        for name, value in values.items():
            p, t = pred == value, np.isin(truth, classes[name])
            inter[name] += int((p & t).sum())
            total[name] += int(p.sum() + t.sum())
    return {name: 2 * inter[name] / total[name] if total[name] else 1.0 for name in values}


def train_or_reuse(reuse: bool, **options) -> Path:
    """`nakt.train(**options)`, or with `reuse` the finished run already at ``options["out"]`` when its card
    records the same options, so that a variant retrains only what it changes."""
    config = Path(options["out"]) / "config.json"
    if reuse and config.is_file():
        record = json.loads(config.read_text())
        if record.get("complete") and all(record["training"].get(k) == v for k, v in options.items()
                                          if k not in ("out", "overwrite", "progress")):
            return Path(options["out"])
    return nakt.train(**options)


POOLS = {"train+transferal": ("teacher_train", "transferal"),  # the splits the students learn from
         "all": ("teacher_train", "teacher_val", "transferal", "finetune")}  # every slice but the test subjects'
STUDENTS = {"union": "union student (teachers' labels)", "control": "control student (full true masks)",
            "marginal": "marginal student (partial true masks)",
            "naive": "naive student (partial true masks, unannotated = background)"}


def variant_tags(variant: dict) -> tuple[str, str]:
    """Folder and results suffixes of a variant: ``(pool, union)``, e.g. ``("_pool_all", "_online_epochs40")``;
    empty for the defaults (so the default run's folders keep their names)."""
    pool = "" if variant.get("pool", "train+transferal") == "train+transferal" else f"_pool_{variant['pool']}"
    union = (["online"] if variant.get("online") else []) + ([variant["fusion"]] if variant.get("fusion") else [])
    union += [f"{key}{value}" for key, value in (variant.get("options") or {}).items()]
    return pool, "".join(f"_{part}" for part in union)


def run_seed(seed: int, data: Path, work: Path, train: dict, student_lr: float, scheme: str,
             teacher_epoch: str = "best", reuse: bool = False, variant: dict | None = None) -> dict:
    """One seed: teachers, union labels and students, scored on test. `variant`: ``fusion`` (nakt label's rule
    for the union labels; None: its default), ``options`` (the union student's own `nakt.train` options), ``pool``
    (a key of `POOLS`) and ``students`` (which of `STUDENTS` to train; None: all)."""
    variant = variant or {}
    pool_tag, union_tag = variant_tags(variant)
    classes, teachers = SCHEMES[scheme]
    splits = data / "splits.json"
    test = json.loads(splits.read_text())["test"]
    common = dict(images=str(data / "images"), channels=CHANNELS, progress=False, seed=seed, overwrite=True, **train)
    scores, specs = {}, []
    for name, (model, codes) in teachers.items():
        masks = partial_masks(data, work / f"masks_{name}", codes, classes)
        if teacher_epoch == "best":  # the epoch that scores best on teacher_val
            validation = dict(val_images=str(data / "images"), val_masks=str(masks), val_cases=f"{splits}:teacher_val")
        else:  # the last epoch, as the students keep
            validation = dict(val_fraction=0)
        run = train_or_reuse(reuse, model=model, masks=str(masks), cases=f"{splits}:teacher_train",
                             out=str(work / f"s{seed}" / name), **validation, **common)
        specs.append(spec_with_names(run, codes))
        pred = nakt.predict(model=str(run), images=str(data / "images"), cases=f"{splits}:test", channels=CHANNELS,
                            out=str(work / f"s{seed}" / f"pred_{name}"), overwrite=True, progress=False)
        scores[f"teacher {name}"] = pooled_dice(pred, data / "masks", test, codes, classes)
    pool = work / f"pool{pool_tag}.txt"  # the slices the students learn from
    names = json.loads(splits.read_text())
    pool_cases = [case for split in POOLS[variant.get("pool", "train+transferal")] for case in names[split]]
    pool.write_text("\n".join(pool_cases) + "\n")
    fusion_tag = f"_{variant['fusion']}" if variant.get("fusion") else ""  # nor on the union student's options
    labels = nakt.label(teacher=specs, images=str(data / "images"), cases=str(pool), channels=CHANNELS,
                        fusion=variant.get("fusion"), overwrite=True, progress=False,
                        out=str(work / f"s{seed}" / f"union_labels{pool_tag}{fusion_tag}"))
    manifest = json.loads((labels / "manifest.json").read_text())
    union_values = dict(zip(manifest["class_names"][1:], manifest["label_values"][1:]))
    full = {name: values[0] for name, values in classes.items()}
    full_masks = partial_masks(data, work / "masks_full", full, classes)
    partial = work / f"masks_partial{pool_tag}"
    annotated = partially_annotated(data, partial, pool_cases, scheme)
    students = {"union": (f"union{pool_tag}{union_tag}", str(labels), union_values, None),
                "control": (f"control{pool_tag}", str(full_masks), full, None),
                "marginal": (f"marginal{pool_tag}", str(partial), full, str(annotated)),
                "naive": (f"naive{pool_tag}", str(partial), full, None)}
    for key in variant.get("students") or STUDENTS:
        folder, masks, values, annotated_classes = students[key]
        out = work / f"s{seed}" / f"{folder}_student"
        own = (variant.get("options") or {}) if key == "union" else {}
        if key == "union" and variant.get("online"):  # the teachers themselves, on every augmented batch
            masks = None
            own = {**own, "teacher": specs, "teacher_mode": "mean", "fusion": variant.get("fusion") or "vote"}
        run = train_or_reuse(reuse, model=STUDENT, masks=masks, cases=str(pool), out=str(out), val_fraction=0,
                             annotated_classes=annotated_classes, **{**common, "lr": student_lr, **own})
        pred = nakt.predict(model=str(run), images=str(data / "images"), cases=f"{splits}:test", channels=CHANNELS,
                            out=str(out.with_name(out.name + "_pred")), overwrite=True, progress=False)
        scores[STUDENTS[key]] = pooled_dice(pred, data / "masks", test, values, classes)
    return {"scores": scores, "label_mapping": manifest["label_mapping"], "union_values": union_values}


def summarise(per_seed: dict, scheme: str) -> dict:
    """Per class: each row's mean Dice over seeds, the best knowing teacher, and the union student's ratio."""
    rows = list(next(iter(per_seed.values()))["scores"])
    mean = {row: {c: statistics.fmean(s["scores"][row][c] for s in per_seed.values())
                  for c in next(iter(per_seed.values()))["scores"][row]} for row in rows}
    union = STUDENTS["union"]
    per_class = {}
    classes, teachers = SCHEMES[scheme]
    for c in classes:
        knowing = {f"teacher {t}": mean[f"teacher {t}"][c] for t, (_, codes) in teachers.items() if c in codes}
        best = max(knowing, key=knowing.get)
        per_class[c] = {"best_teacher": best, "best_teacher_dice": knowing[best], "union_dice": mean[union][c],
                        "ratio": mean[union][c] / knowing[best] if knowing[best] else None,
                        **{f"{key}_dice": mean.get(STUDENTS[key], {}).get(c) for key in ("control", "marginal",
                                                                                          "naive")}}
    # a class no teacher segments (Dice 0) is met trivially; the table shows its ratio as "-"
    return {"mean": mean, "per_class": per_class,
            "target_met": all(p["union_dice"] >= 0.95 * p["best_teacher_dice"] for p in per_class.values())}


def markdown(result: dict) -> str:
    s, teachers = result["summary"], SCHEMES[result["config"]["scheme"]][1]
    config = result["config"]
    lines = [f"# Partial teachers on brats6 ({result['mode']} mode, scheme {config['scheme']}, seeds "
             f"{config['seeds']}, Dice loss {'per batch' if config.get('batch_dice') else 'per image'}, teachers' "
             f"validation {config.get('val_metric', 'dice')}, teachers' epoch {config.get('teacher_epoch', 'best')}"
             f"{union_variant(config)})",
             "",
             f"Command: `{result['command']}`  ", "",
             f"| class | teacher A ({teachers['A'][0]}) | teacher B ({teachers['B'][0]}) | union student ({STUDENT}) | "
             "union / best knowing teacher | control student (full true masks) | marginal student (partial true "
             "masks) | naive student (partial true masks) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c, p in s["per_class"].items():
        a, b = (s["mean"][f"teacher {t}"].get(c) for t in teachers)
        cell = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        ratio = "-" if p["ratio"] is None else f"{p['ratio']:.2f}x"
        lines.append(f"| {c} | {cell(a)} | {cell(b)} | {p['union_dice']:.4f} | {ratio} | {cell(p['control_dice'])} | "
                     f"{cell(p['marginal_dice'])} | {cell(p['naive_dice'])} |")
    lines += ["", f"Target (union student >= 0.95x the best teacher that knows each class, mean of the seeds): "
              f"{'met' if s['target_met'] else '**not met**'}"]
    return "\n".join(lines) + "\n"


def union_variant(config: dict) -> str:
    """The variant for the title: the union labels' fusion, the union student's options and the students' pool
    where they are not the defaults."""
    parts = ["union student taught online by the teachers"] if config.get("union_online") else []
    parts += [f"union labels fused by {config['union_fusion']}"] if config.get("union_fusion") else []
    parts += [f"union student {k}={v}" for k, v in (config.get("union_options") or {}).items()]
    parts += [f"students learn from {config['pool']}"] if config.get("pool", "train+transferal") != "train+transferal" \
        else []
    return "".join(f", {p}" for p in parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 64 px, 3 epochs")
    parser.add_argument("--scheme", choices=SCHEMES, default="brats17", help="the classes (see the docstring)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--batch-dice", action="store_true", help="every network trains with nakt's --batch-dice")
    parser.add_argument("--val-metric", default="dice", help="the teachers' validation score (nakt's --val-metric)")
    parser.add_argument("--teacher-epoch", choices=("best", "last"), default="best",
                        help="the teachers keep their best epoch on teacher_val, or their last (as the students)")
    parser.add_argument("--union-fusion", help="nakt label's rule for the union labels (default: nakt's default)")
    parser.add_argument("--union-online", action="store_true",
                        help="the union student learns from the teachers run on its own augmented batches "
                             "(nakt distill --teacher-mode mean, fused by --union-fusion or the vote), not the labels")
    parser.add_argument("--union-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a nakt.train option for the union student alone (e.g. epochs=40, spatial_augment=true)")
    parser.add_argument("--pool", choices=POOLS, default="train+transferal",
                        help="the slices the students learn from: teacher_train + transferal, or every slice of the "
                             "four non-test subjects")
    parser.add_argument("--students", nargs="+", choices=STUDENTS, help="train only these students (default: all)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs in the work folder trained with the same settings (variants)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--work", default=str(ROOT / "runs" / "benchmarks" / "partial_teachers"))
    parser.add_argument("--out", help="results folder (default benchmarks/results, or its quick/ in quick mode)")
    args = parser.parse_args(argv)
    if args.students and "union" not in args.students:
        parser.error("--students: the union student is what the benchmark measures; name it too")
    source = Path(args.data)
    if not source.is_dir():
        sys.exit(f"partial_teachers: {source}: dataset folder not found")
    work = Path(args.work) / ("quick" if args.quick else "full")
    data = prepare_brats_slices(source, work / "prepared")
    work = work / args.scheme  # the partial masks depend on the scheme, the prepared slices do not
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    train = {"size": [args.size or (64 if args.quick else 128)], "epochs": args.epochs or (3 if args.quick else 20),
             "batch_size": 8, "lr": 1e-3, "batch_dice": args.batch_dice, "val_metric": args.val_metric}
    options = {key.replace("-", "_"): yaml.safe_load(value)
               for key, _, value in (item.partition("=") for item in args.union_option)}
    variant = {"fusion": args.union_fusion, "online": args.union_online, "options": options, "pool": args.pool,
               "students": args.students}
    command = " ".join(["python", "benchmarks/partial_teachers.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.time()
    per_seed = {}
    for seed in seeds:
        per_seed[str(seed)] = run_seed(seed, data, work, train, student_lr=1e-3, scheme=args.scheme,
                                       teacher_epoch=args.teacher_epoch, reuse=args.reuse, variant=variant)
        print(f"[seed {seed}] " + json.dumps(per_seed[str(seed)]["scores"]), flush=True)
    result = {"mode": "quick" if args.quick else "full", "command": command,
              "config": {**train, "seeds": seeds, "scheme": args.scheme, "teacher_epoch": args.teacher_epoch,
                         "union_fusion": args.union_fusion, "union_online": args.union_online,
                         "union_options": options, "pool": args.pool,
                         "classes": SCHEMES[args.scheme][0],
                         "teachers": SCHEMES[args.scheme][1],
                         "student": STUDENT},
              "machine": this_machine().to_json(), "per_seed": per_seed, "summary": summarise(per_seed, args.scheme),
              "total_wall_s": time.time() - started}
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    pool_tag, union_tag = variant_tags(variant)
    stem = ("partial_teachers" + ("" if args.scheme == "brats17" else f"_{args.scheme}")
            + ("_batch_dice" if args.batch_dice else "") + ("" if args.val_metric == "dice" else f"_{args.val_metric}")
            + ("" if args.teacher_epoch == "best" else f"_{args.teacher_epoch}_epoch")
            + pool_tag + (f"_union{union_tag}" if union_tag else ""))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
