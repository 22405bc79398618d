"""Classification transfer benchmark: knowledge distillation vs transfer learning on small labelled budgets.

For one dataset and each seed: teachers of three families learn from a labelled part; for each labelled budget
(e.g. 200 and 1000 images) the student architecture is trained (a) from scratch on the budget, (b) as classic
transfer learning (teacher 0's weights fine-tuned on the budget, same architecture), (c) distilled offline from
teacher 0's annotations of the unlabelled rest, (d) from the mean of the three teachers' annotations, and (e) by
RoS-KD (K teachers on overlapping subsets, one drawn per step, EMA student); (c)-(e) are then fine-tuned on the
budget. A label-noise run (a fraction of the teacher data's labels flipped) compares the plain student with the
RoS-KD student, and FGSM/PGD accuracy is reported for the KD and the plain students. Everything is scored on
the test split. Writes ``<out>/<dataset>.json`` and ``<out>/<dataset>.md``.

    python benchmarks/classification_transfer.py --config configs/benchmarks/kermany_cxr.yaml [--quick]

Only nakt's public API is used.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import nakt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segmentation_transfer import ROOT, dataset_folder, load_config, machine  # noqa: E402  (the sibling benchmark script)

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def prepare(cfg: dict, data: Path, work: Path, max_images: int | None) -> tuple[Path, dict]:
    """One images folder, ``labels.csv`` (image,label) and split lists: teacher, teacher_val, unlabelled, test.

    Class-folder sets (kermany_cxr) are read as they are; CSV sets (eyepacs_dr) may map a column to binary
    classes (``binarize_at``: grade >= k is positive) and use their own splits.json (train/val/test).
    """
    rng = np.random.default_rng(0)
    rows: dict[str, list[tuple[str, str]]] = {}
    if cfg.get("layout") == "class_folders":
        images = data
        for split in ("train", "test"):
            files = sorted(p for p in (data / split).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            rows[split] = [(p.relative_to(data).as_posix(), p.parent.name) for p in files]
        train = rows["train"]
    else:
        images = data / "images"
        with open(data / "labels.csv") as f:
            table = {Path(r["image"]).stem: r for r in csv.DictReader(f)}
        splits = json.loads((data / "splits.json").read_text())

        def label(r):
            value = int(r[cfg["label_column"]])
            return str(int(value >= cfg["binarize_at"])) if "binarize_at" in cfg else str(value)

        train = [(table[s]["image"], label(table[s])) for s in splits["train"] + splits.get("val", [])]
        rows["test"] = [(table[s]["image"], label(table[s])) for s in splits["test"]]
    order = rng.permutation(len(train))
    n_teacher = round(cfg["teacher_fraction"] * len(train))
    # optional caps (a CPU-sized run): random samples, since `order` is a permutation; the test split stays whole
    teacher_part = [train[i] for i in order[:n_teacher]][:cfg.get("max_teacher_images")]
    unlabelled = [train[i] for i in order[n_teacher:]][:cfg.get("max_unlabelled_images")]
    n_val = max(2, round(0.15 * len(teacher_part)))
    parts = {"teacher_val": teacher_part[:n_val], "teacher": teacher_part[n_val:], "unlabelled": unlabelled,
             "test": rows["test"]}
    if max_images:  # a random sample: the lists are sorted by class
        parts = {k: [v[i] for i in sorted(rng.permutation(len(v))[:max_images])] for k, v in parts.items()}
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "label"), *dict.fromkeys(r for v in parts.values() for r in v)])
    lists = {}
    for name, part in parts.items():
        lists[name] = work / f"{name}.txt"
        lists[name].write_text("\n".join(p for p, _ in part) + "\n")
    for budget in cfg["budgets"]:  # the labelled budgets are the first images of the unlabelled part
        lists[f"budget{budget}"] = work / f"budget{budget}.txt"
        lists[f"budget{budget}"].write_text("\n".join(p for p, _ in parts["unlabelled"][:budget]) + "\n")
    lists["labels"] = work / "labels.csv"
    return images, {k: str(v) for k, v in lists.items()}


def run_seed(cfg: dict, images: Path, lists: dict, work: Path, seed: int) -> dict:
    labels = lists["labels"]
    common = {"task": "classification", "images": str(images), "progress": False, "seed": seed,
              **cfg.get("train", {})}
    val = {"val_images": str(images), "val_labels": labels, "val_cases": lists["teacher_val"]}
    evaluate = {"images": str(images), "labels": labels, "cases": lists["test"], "progress": False,
                "graded": cfg.get("graded", False)}
    tune = {**common, **cfg.get("finetune", {})}
    rows: dict[str, dict] = {}

    def score(row: str, run: Path, started: float, attacks: bool = False) -> None:
        result = nakt.evaluate(model=str(run), out=str(run / "eval"), **evaluate)["mean"]
        entry = {**result, "wall_s": time.time() - started}
        if attacks:
            for attack in ("fgsm", "pgd"):
                attacked = nakt.evaluate(model=str(run), out=str(run / f"eval_{attack}"), attack=attack,
                                         eps=cfg["eps"], steps=cfg.get("pgd_steps", 10), **evaluate)["mean"]
                entry[f"{attack}_accuracy"] = attacked["accuracy"]
        rows[row] = entry
        print(f"[seed {seed}] {row}: AUC {entry['auc']}  accuracy {entry['accuracy']:.4f}  "
              f"({entry['wall_s']:.0f} s)", flush=True)

    teachers = []
    for i, spec in enumerate(cfg["teachers"]):
        t0 = time.time()
        run = nakt.train(model=spec, labels=labels, cases=lists["teacher"], out=str(work / f"teacher{i}"),
                         overwrite=True, **val, **common)
        teachers.append(run)
        score(f"teacher {spec}", run, t0)
    t0 = time.time()
    roskd = nakt.train(model=cfg["teachers"][0], labels=labels, cases=lists["teacher"], out=str(work / "roskd"),
                       subsets=cfg["roskd_k"], subset_fraction=cfg["roskd_fraction"], overwrite=True, **val, **common)
    roskd_teachers = [str(roskd / f"subset_{k}") for k in range(cfg["roskd_k"])]
    label_sets = {}
    for name, members in (("teacher0", [teachers[0]]), ("mean3", teachers)):
        label_sets[name] = nakt.label(task="classification", teacher=[str(t) for t in members], images=str(images),
                                      cases=lists["unlabelled"], out=str(work / f"labels_{name}"), progress=False)
    student = cfg["student"]
    for budget in cfg["budgets"]:
        small = {"labels": labels, "cases": lists[f"budget{budget}"], "val_fraction": 0.15}
        attacks = budget == max(cfg["budgets"])  # attacks (PGD above all) are costly: the largest budget only
        t0 = time.time()
        run = nakt.train(model=student, out=str(work / f"scratch{budget}"), overwrite=True, **small, **common)
        score(f"[{budget}] {student} from scratch", run, t0, attacks=attacks)
        t0 = time.time()
        run = nakt.finetune(model=str(teachers[0]), out=str(work / f"tl{budget}"), overwrite=True,
                            **small, **tune)
        score(f"[{budget}] transfer learning ({cfg['teachers'][0]} fine-tuned)", run, t0)
        for name in ("teacher0", "mean3"):
            t0 = time.time()
            kd = nakt.train(model=student, labels=str(label_sets[name]), cases=lists["unlabelled"],
                            temperature=cfg["temperature"], out=str(work / f"kd_{name}{budget}"), overwrite=True,
                            **val, **{k: v for k, v in common.items()})
            run = nakt.finetune(model=str(kd), out=str(work / f"kd_{name}{budget}_ft"), overwrite=True,
                                **small, **tune)
            score(f"[{budget}] KD from {name} annotations + fine-tune", run, t0, attacks=attacks and name == "teacher0")
        t0 = time.time()
        kd = nakt.train(model=student, teacher=roskd_teachers, teacher_mode="random", alpha=1.0, ema=cfg["ema"],
                        temperature=cfg["temperature"], labels=str(label_sets["teacher0"]),
                        cases=lists["unlabelled"], out=str(work / f"roskd{budget}"), overwrite=True, **val, **common)
        run = nakt.finetune(model=str(kd), out=str(work / f"roskd{budget}_ft"), overwrite=True,
                            **small, **tune)
        score(f"[{budget}] RoS-KD ({cfg['roskd_k']} subset teachers) + fine-tune", run, t0, attacks=attacks)
    noise = cfg.get("label_noise", 0.2)
    t0 = time.time()
    run = nakt.train(model=student, labels=labels, cases=lists["teacher"], label_noise=noise,
                     out=str(work / "noisy_plain"), overwrite=True, **val, **common)
    score(f"[noise {noise:.0%}] {student} on noisy labels", run, t0)
    t0 = time.time()
    noisy = nakt.train(model=cfg["teachers"][0], labels=labels, cases=lists["teacher"], label_noise=noise,
                       subsets=cfg["roskd_k"], subset_fraction=cfg["roskd_fraction"], out=str(work / "noisy_roskd"),
                       overwrite=True, **val, **common)
    run = nakt.train(model=student, teacher=[str(noisy / f"subset_{k}") for k in range(cfg["roskd_k"])],
                     teacher_mode="random", ema=cfg["ema"], temperature=cfg["temperature"], labels=labels,
                     cases=lists["teacher"], label_noise=noise, out=str(work / "noisy_roskd_student"),
                     overwrite=True, **val, **common)
    score(f"[noise {noise:.0%}] RoS-KD student on noisy labels", run, t0)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--max-images", type=int, help="at most this many images per part (smoke tests)")
    parser.add_argument("--work")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    cfg = load_config(Path(args.config), args.quick)
    name = cfg["name"]
    data = dataset_folder(args.data or cfg["data"], "classification_transfer")
    # quick runs get their own folder: sharing one would overwrite a full run's seed 0
    work = Path(args.work or ROOT / "runs" / "benchmarks" / ("quick" if args.quick else "") / name)
    images, lists = prepare(cfg, data, work / "data", args.max_images)
    seeds = args.seeds or (cfg["seeds"][:1] if args.quick else cfg["seeds"])
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    started, per_seed = time.time(), {}
    for seed in seeds:
        per_seed[seed] = run_seed(cfg, images, lists, work / f"seed{seed}", seed)
        rows = {}
        for row in per_seed[seed]:
            entry = {"per_seed": {str(s): per_seed[s][row] for s in per_seed}}
            for key in per_seed[seed][row]:
                values = [per_seed[s][row][key] for s in per_seed if per_seed[s][row].get(key) is not None]
                if values:
                    entry[f"{key}_mean"] = statistics.fmean(values)
                    entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            rows[row] = entry
        result = {"dataset": name, "mode": "quick" if args.quick else "full", "seeds": list(per_seed),
                  "seeds_planned": seeds, "config": cfg, "machine": machine(cfg.get("train", {}).get("device", "auto")),
                  "command": " ".join(["python", "benchmarks/classification_transfer.py",
                                       *(sys.argv[1:] if argv is None else argv)]),
                  "total_wall_s": time.time() - started, "rows": rows}
        (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / f"{name}.md").write_text(markdown(name, result))
    print(markdown(name, result))
    return result


def markdown(name: str, result: dict) -> str:
    cols = ["auc", "accuracy", "f1", "balanced_accuracy", "ece", "kappa", "fgsm_accuracy", "pgd_accuracy"]
    present = [c for c in cols if any(f"{c}_mean" in e for e in result["rows"].values())]
    lines = [f"# {name}: classification transfer ({result['mode']} mode, {len(result['seeds'])} of "
             f"{len(result['seeds_planned'])} seeds, {result['machine']['device']})", "",
             f"Command: `{result['command']}`  ", f"Total wall time: {result['total_wall_s'] / 60:.1f} min", "",
             "| row | " + " | ".join(present) + " | wall time (s) |", "| --- |" + " --- |" * (len(present) + 1)]
    for row, e in result["rows"].items():
        cells = [f"{e[c + '_mean']:.4f} ± {e[c + '_std']:.4f}" if f"{c}_mean" in e else "-" for c in present]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {e.get('wall_s_mean', 0):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
