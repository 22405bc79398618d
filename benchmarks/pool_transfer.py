"""Large unlabelled pools: do more cheap, unlabelled images make a student beat its teachers?

Teachers trained on ../shared/data/cxr_lungs (teacher_train, validated on teacher_val) annotate the chest X-rays
of ../shared/data/kermany_cxr (paediatric, thousands of images, no lung masks) once, fused by `--fusion`; students
of the teachers' capacity and of a smaller one train on the labels of the first 85 / 500 / 2,000 / all pool
images only (validated on cxr_lungs teacher_val, as the teachers were); everything is scored on cxr_lungs test
beside the teachers. Every student gets about the same training budget (`--samples` images seen, by default
one pass over the largest pool; epochs = samples / pool size, rounded up), so what varies along the sweep is
how many distinct images a student learns from, not how long it trains. `--diagnose` adds students that each
change one thing (`diagnose_seed`), to tell why the pool's students stay below the best teacher. Writes
``<out>/<name>.json`` and ``.md`` (``pool_transfer`` unless `--name`).

    python benchmarks/pool_transfer.py [--quick] [--seeds 0 1 2] [--pool-sizes 85 500 2000 0]  (0: all)
    python benchmarks/pool_transfer.py --pool-sizes 85 500 2000 --samples 2000 --diagnose --students capacity
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import nakt
from nakt.fusion import default_fusion
from nakt.io.dataset import discover_cases
from nakt.io.rundir import best_score, read_metrics

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LUNGS, POOL = SHARED / "cxr_lungs", SHARED / "kermany_cxr"
TEACHERS = ["smp:Unet/resnet18", "smp:DeepLabV3Plus/mobilenet_v2", "monai:UNet"]
STUDENTS = {"capacity": "smp:Unet/resnet18", "small": "smp:FPN/mobilenet_v2"}


def pool_folder(work: Path) -> tuple[Path, list[str]]:
    """Every Kermany training image as one flat folder of symlinks (class folders are not case folders), in a
    fixed shuffled order, so that the first N are a random pool of N."""
    import random

    folder = work / "pool"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted((POOL / "train").glob("*/*.jpeg")):
        name = f"{path.parent.name}_{path.stem}"
        link(folder / f"{name}.jpeg", path)
        names.append(name)
    random.Random(0).shuffle(names)
    return folder, names


def link(path: Path, target: Path) -> None:
    if not path.exists():
        path.symlink_to(target)


def write_list(path: Path, names: list[str]) -> str:
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return str(path)


def test_dice(work: Path, run: Path, tests: str) -> float:
    summary = nakt.evaluate(model=str(run), images=str(LUNGS / "images"), masks=str(LUNGS / "masks"), cases=tests,
                            out=str(work / f"eval_{run.name}"), hd95=False, overwrite=True, progress=False)
    return summary["mean"]["dice"]


def student_epochs(samples: int, pool_size: int) -> int:
    """Epochs that show a student `samples` images (rounded up) from a pool of `pool_size`."""
    return max(1, -(-samples // pool_size))


def train_student(work: Path, name: str, spec: str, images: str, labels: Path, cases: str, samples: int, seed: int,
                  train: dict, val: dict, tests: str) -> float:
    """One student on a label set's `cases` for about `samples` images seen; its cxr_lungs test Dice."""
    n_cases = len(Path(cases).read_text(encoding="utf-8").split())
    run = work / name
    nakt.train(model=spec, images=images, masks=str(labels), cases=cases, out=str(run), overwrite=True, seed=seed,
               progress=False, **val, **{**train, "epochs": student_epochs(samples, n_cases)})
    return test_dice(work, run, tests)


def run_seed(work: Path, seed: int, sizes: list[int], train: dict, samples: int, fusion: str, lists: dict,
             pool: tuple, roles: list[str], diagnose: bool) -> dict:
    """The teachers, the pool's label set, and every student, for one seed: ``{row: test Dice}``.

    With `diagnose`, more students of the first role (`diagnose_seed`)."""
    work.mkdir(parents=True, exist_ok=True)
    lungs = {"images": str(LUNGS / "images"), "masks": str(LUNGS / "masks"), "progress": False}
    val = {"val_images": str(LUNGS / "images"), "val_masks": str(LUNGS / "masks"), "val_cases": lists["val"]}
    rows, teachers, val_dice = {}, [], []
    for k, spec in enumerate(TEACHERS):
        run = work / f"teacher{k}"
        nakt.train(model=spec, cases=lists["train"], out=str(run), overwrite=True, seed=seed, **lungs, **val,
                   **train)
        teachers.append(str(run))
        val_dice.append(best_score(read_metrics(run))[0])
        rows[f"teacher {spec}"] = test_dice(work, run, lists["test"])
        print(f"[seed {seed}] teacher {spec}: {rows[f'teacher {spec}']:.4f}", flush=True)
    folder, names = pool
    largest = max(len(names) if n == 0 else n for n in sizes)
    labels = nakt.label(teacher=teachers, images=str(folder), cases=write_list(work / "pool.txt", names[:largest]),
                        out=str(work / "labels"), fusion=fusion, overwrite=True, progress=False)
    common = {"seed": seed, "train": train, "val": val, "tests": lists["test"]}

    def student(row: str, name: str, role: str, images: str, label_set: Path, cases: str, budget: int) -> None:
        rows[row] = train_student(work, name, STUDENTS[role], images, label_set, cases, budget, **common)
        print(f"[seed {seed}] {row}: {rows[row]:.4f}", flush=True)

    for n in sizes:
        chosen = names if n == 0 else names[:n]
        cases = write_list(work / f"pool_{len(chosen)}.txt", chosen)
        for role in roles:
            student(f"student ({role}: {STUDENTS[role]}) on {len(chosen)} pool images", f"student_{role}_{len(chosen)}",
                    role, str(folder), labels, cases, samples)
    if diagnose:
        diagnose_seed(work, teachers, val_dice, pool, largest, labels, roles[0], samples, fusion, lists, student)
    return rows


def diagnose_seed(work: Path, teachers: list[str], val_dice: list[float], pool: tuple, largest: int, labels: Path,
                  role: str, samples: int, fusion: str, lists: dict, student) -> None:
    """Students that each change one thing against the student of the `largest` pool, to tell why the pool's
    students stay below the best teacher: the best teacher's labels alone (by validation Dice; is it the fusion?),
    cxr_lungs' own transferal images at the same budget, fused and best-teacher labels (is it the pool's
    population?), those images added to the pool (do out-of-domain images help or hurt?), and twice the training
    budget (is the student undertrained?). `student(row, name, role, images, label_set, cases, budget)` trains
    and scores one."""
    folder, names = pool
    best, spec = max(range(len(teachers)), key=lambda k: val_dice[k]), f"{role}: {STUDENTS[role]}"
    pool_cases, transferal = str(work / f"pool_{largest}.txt"), lists["transferal"]
    mixed = work / "mixed"  # the pool's links and cxr_lungs' transferal images, in one folder
    mixed.mkdir(exist_ok=True)
    in_domain = discover_cases(LUNGS / "images", cases=transferal)
    for name in names[:largest]:
        link(mixed / f"{name}.jpeg", (folder / f"{name}.jpeg").resolve())
    for case in in_domain:
        link(mixed / case.images[0].name, case.images[0])
    mixed_cases = write_list(work / "mixed.txt", names[:largest] + [case.name for case in in_domain])

    def label(name: str, images: Path, cases: str, one: bool) -> Path:
        return nakt.label(teacher=[teachers[best]] if one else teachers, images=str(images), cases=cases,
                          out=str(work / name), fusion=None if one else fusion, overwrite=True, progress=False)

    alone = f"best-validation teacher's labels alone ({TEACHERS[best]})"
    arms = [  # row, run folder, images, label set, cases, budget
        (f"on {largest} pool images, {alone}", "best_teacher", folder,
         label("labels_best_teacher", folder, pool_cases, True), pool_cases, samples),
        ("on cxr_lungs transferal images (in domain), fused labels", "in_domain", LUNGS / "images",
         label("labels_in_domain", LUNGS / "images", transferal, False), transferal, samples),
        (f"on cxr_lungs transferal images (in domain), {alone}", "in_domain_best_teacher", LUNGS / "images",
         label("labels_in_domain_best_teacher", LUNGS / "images", transferal, True), transferal, samples),
        (f"on {largest} pool images and cxr_lungs transferal images, fused labels", "mixed", mixed,
         label("labels_mixed", mixed, mixed_cases, False), mixed_cases, samples),
        (f"on {largest} pool images, twice the training budget", "long", folder, labels, pool_cases, 2 * samples),
    ]
    for row, name, images, label_set, cases, budget in arms:
        student(f"diagnosis: student ({spec}) {row}", f"diagnose_{role}_{name}", role, str(images), label_set,
                cases, budget)


def markdown(result: dict) -> str:
    lines = [f"# Large unlabelled pool: cxr_lungs teachers label Kermany chest X-rays ({result['mode']} mode, "
             f"{len(result['seeds'])} seed(s), {result['machine']['device']})", "",
             f"Teachers: {result['train']}; every student sees at least {result['student_samples']} pool images "
             f"in training (epochs = that / pool size, rounded up); fusion `{result['fusion']}`.  ",
             f"Command: `{result['command']}`  ", f"Total wall time: {result['total_wall_s'] / 60:.1f} min", "",
             "| row | cxr_lungs test Dice (mean ± std) |", "| --- | --- |"]
    lines += [f"| {row} | {e['mean']:.4f} ± {e['std']:.4f} |" for row, e in result["rows"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 64 px, 2 epochs, pools of 16 and 32")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--pool-sizes", type=int, nargs="+", help="pool images per student (0: all)")
    parser.add_argument("--size", type=int)
    parser.add_argument("--epochs", type=int, help="teacher epochs")
    parser.add_argument("--samples", type=int,
                        help="images each student sees in training (default: one pass over the largest pool)")
    parser.add_argument("--fusion", default=default_fusion("segmentation", len(TEACHERS)), help="default: nakt label's")
    parser.add_argument("--students", nargs="+", choices=list(STUDENTS), default=list(STUDENTS),
                        help="student roles to train (default: both)")
    parser.add_argument("--diagnose", action="store_true",
                        help="five more students of the first role at the largest pool size: the best teacher's "
                             "labels alone, in-domain images (fused and best-teacher labels), the pool mixed with "
                             "them, twice the budget")
    parser.add_argument("--name", help="results file stem (default: pool_transfer, or pool_transfer_quick)")
    parser.add_argument("--max-cases", type=int, help="at most this many cxr_lungs cases per split (smoke tests)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "pool_transfer"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if not (LUNGS.is_dir() and POOL.is_dir()):
        sys.exit(f"pool_transfer: needs {LUNGS} and {POOL}")
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    sizes = args.pool_sizes or ([16, 32] if args.quick else [85, 500, 2000, 0])
    train = {"size": [args.size or (64 if args.quick else 128)], "epochs": args.epochs or (2 if args.quick else 20),
             "batch_size": 8, "lr": 1e-3}
    work = Path(args.work) / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    splits = json.loads((LUNGS / "splits.json").read_text(encoding="utf-8"))
    lists = {key: write_list(work / f"{key}.txt", splits[split][:args.max_cases])
             for key, split in (("train", "teacher_train"), ("val", "teacher_val"), ("test", "test"),
                                 ("transferal", "transferal"))}
    pool = pool_folder(work)
    samples = args.samples or max(len(pool[1]) if n == 0 else n for n in sizes)
    command = " ".join(["python", "benchmarks/pool_transfer.py", *(sys.argv[1:] if argv is None else argv)])
    started, per_seed = time.time(), {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:  # results are rewritten after every seed
        per_seed[seed] = run_seed(work / f"seed{seed}", seed, sizes, train, samples, args.fusion, lists, pool,
                                  args.students, args.diagnose)
        rows = {row: {"mean": statistics.fmean(s[row] for s in per_seed.values()),
                      "std": statistics.stdev([s[row] for s in per_seed.values()]) if len(per_seed) > 1 else 0.0,
                      "per_seed": {str(k): s[row] for k, s in per_seed.items()}} for row in per_seed[seeds[0]]}
        result = {"mode": "quick" if args.quick else "full", "seeds": list(per_seed), "pool_sizes": sizes,
                  "pool_images": len(pool[1]), "train": train, "student_samples": samples, "fusion": args.fusion,
                  "students": args.students, "diagnose": args.diagnose,
                  "command": command,
                  "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                              "device": f"CPU ({os.cpu_count()} cores)"},
                  "total_wall_s": time.time() - started, "rows": rows}
        stem = args.name or "pool_transfer" + ("_quick" if args.quick else "")
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        (out / f"{stem}.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
