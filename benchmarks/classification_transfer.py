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
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import nakt
from nakt.io.outputs import atomic_path

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
        with open(data / "labels.csv", encoding="utf-8") as f:
            table = {Path(r["image"]).stem: r for r in csv.DictReader(f)}
        splits = json.loads((data / "splits.json").read_text(encoding="utf-8"))

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
    table = io.StringIO()
    csv.writer(table).writerows([("image", "label"), *dict.fromkeys(r for v in parts.values() for r in v)])
    _write(work / "labels.csv", table.getvalue())
    lists = {}
    for name, part in parts.items():
        lists[name] = work / f"{name}.txt"
        _write(lists[name], "\n".join(p for p, _ in part) + "\n")
    for budget in cfg["budgets"]:  # the labelled budgets are the first images of the unlabelled part
        lists[f"budget{budget}"] = work / f"budget{budget}.txt"
        _write(lists[f"budget{budget}"], "\n".join(p for p, _ in parts["unlabelled"][:budget]) + "\n")
    lists["labels"] = work / "labels.csv"
    return images, {k: str(v) for k, v in lists.items()}


def _write(path: Path, text: str) -> None:
    """Write through a temporary file: processes running other seeds read these files meanwhile."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def run_seed(cfg: dict, images: Path, lists: dict, work: Path, seed: int) -> dict:
    labels = lists["labels"]
    common = {"task": "classification", "images": str(images), "progress": False, "seed": seed,
              **cfg.get("train", {})}
    val = {"val_images": str(images), "val_labels": labels, "val_cases": lists["teacher_val"]}
    evaluate = {"images": str(images), "labels": labels, "cases": lists["test"], "progress": False,
                "graded": cfg.get("graded", False), "overwrite": True}
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
                                      cases=lists["unlabelled"], out=str(work / f"labels_{name}"), progress=False,
                                      overwrite=True)
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
    parser.add_argument("--resume", action="store_true", help="keep seeds already finished with this config")
    args = parser.parse_args(argv)
    cfg = load_config(Path(args.config), args.quick)
    name = cfg["name"]
    data = dataset_folder(args.data or cfg["data"], "classification_transfer")
    # quick runs get their own folder: sharing one would overwrite a full run's seed 0
    work = Path(args.work or ROOT / "runs" / "benchmarks" / ("quick" if args.quick else "") / name)
    images, lists = prepare(cfg, data, work / "data", args.max_images)
    planned = cfg["seeds"][:1] if args.quick else cfg["seeds"]
    seeds = args.seeds or planned
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        # each finished seed leaves its rows beside its runs, so `--resume` skips it and processes running other
        # seeds (`--seeds 1`, `--seeds 2` side by side) add up to one table
        done = work / f"seed{seed}" / "rows.json"
        if not (args.resume and _finished_seed(done, cfg)):
            started = time.time()
            rows = run_seed(cfg, images, lists, work / f"seed{seed}", seed)
            _write(done, json.dumps({"config": cfg, "rows": rows, "wall_s": time.time() - started}) + "\n")
        finished = {s: _finished_seed(work / f"seed{s}" / "rows.json", cfg) for s in dict.fromkeys(planned + seeds)}
        finished = {s: saved for s, saved in finished.items() if saved is not None}
        per_seed = {s: saved["rows"] for s, saved in finished.items()}
        result = {"dataset": name, "mode": "quick" if args.quick else "full", "seeds": list(per_seed),
                  "seeds_planned": planned, "config": cfg,
                  "machine": machine(cfg.get("train", {}).get("device", "auto")),
                  "command": " ".join(["python", "benchmarks/classification_transfer.py",
                                       *(sys.argv[1:] if argv is None else argv)]),
                  "seed_wall_s": {str(s): saved["wall_s"] for s, saved in finished.items()},
                  "total_wall_s": sum(saved["wall_s"] for saved in finished.values()),
                  "rows": summarise(per_seed)}
        _write(out / f"{name}.json", json.dumps(result, indent=1) + "\n")
        _write(out / f"{name}.md", markdown(name, result))
    print(markdown(name, result))
    return result


def _finished_seed(path: Path, cfg: dict) -> dict | None:
    """A seed's saved ``{config, rows, wall_s}`` from an earlier run with the same config, else None."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return saved if saved["config"] == cfg else None


def summarise(per_seed: dict[int, dict]) -> dict:
    """Per row: every seed's entry, and mean and standard deviation over seeds of each number."""
    rows = {}
    for row in next(iter(per_seed.values())):
        entries = [per_seed[s][row] for s in per_seed if row in per_seed[s]]
        summary = {"per_seed": {str(s): per_seed[s][row] for s in per_seed if row in per_seed[s]}}
        for key in entries[0]:
            values = [e[key] for e in entries if e.get(key) is not None]
            if values:
                summary[f"{key}_mean"] = statistics.fmean(values)
                summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows[row] = summary
    return rows


def markdown(name: str, result: dict) -> str:
    cols = ["auc", "accuracy", "f1", "balanced_accuracy", "ece", "kappa", "fgsm_accuracy", "pgd_accuracy"]
    present = [c for c in cols if any(f"{c}_mean" in e for e in result["rows"].values())]
    per_seed = ", ".join(f"{w / 60:.1f}" for w in result["seed_wall_s"].values())
    lines = [f"# {name}: classification transfer ({result['mode']} mode, {len(result['seeds'])} of "
             f"{len(result['seeds_planned'])} seeds, {result['machine']['device']})", "",
             f"Last command: `{result['command']}`  ",
             f"Wall time per seed: {per_seed} min (seeds run side by side share the cores)", "",
             "| row | " + " | ".join(present) + " | wall time (s) |", "| --- |" + " --- |" * (len(present) + 1)]
    for row, e in result["rows"].items():
        cells = [f"{e[c + '_mean']:.4f} ± {e[c + '_std']:.4f}" if f"{c}_mean" in e else "-" for c in present]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {e.get('wall_s_mean', 0):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
