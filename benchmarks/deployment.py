"""The deployment student: each teacher, the teachers' ensemble as ``nakt label`` runs it, and students of two
sizes, with Dice and cost per case; and the semi-supervised rows.

Per dataset config (the segmentation protocol's splits and training options, `segmentation_transfer.Bench`) and
seed:
- the config's teachers, trained on `teacher_train` (best epoch on `teacher_val`);
- the ensemble: ``nakt label``'s default fusion of the teachers on the `test` split, scored as a label set;
- the fused labels of the `transferal` split, and on them alone two small students (smp Linknet/mobilenet_v2 and
  monai:UNet) and a large one (smp Unet/resnet34, at least the size of the largest teacher);
- semi-supervised: the large student on `teacher_train`'s true masks and the transferal pseudo-labels together
  (``--labelled-images``, half of each batch), without and with stability filtering (the fifth of the transferal
  cases the teachers disagree on most left out, `nakt.recipes.stable_cases`).
Every model is scored on `test` (the config's `roi` applied); its cost per case (`nakt.cost`) is measured on the
first test case: parameters, forward FLOPs, median latency in PyTorch (the run's precision), and for the students
the latency of their ONNX export under ONNX Runtime. The costs are measured together after a seed's training, so
that every model's latency is taken under the same load of the machine.

    python benchmarks/deployment.py --config configs/benchmarks/drive.yaml    # 3 seeds -> results/deployment_drive.*
    python benchmarks/deployment.py --config configs/benchmarks/cxr_lungs.yaml --seeds 0
    python benchmarks/deployment.py --config configs/benchmarks/drive.yaml --quick    # 1 seed -> results/quick/
    python benchmarks/deployment.py --config configs/benchmarks/drive.yaml --seeds 0 1 --resume  # seed 0 kept
    python benchmarks/deployment.py --config configs/benchmarks/drive.yaml --seeds 0 1 --resume \
        --student-option val_fraction=0 --student-option patches_per_case=32 --rows small compact
    python benchmarks/deployment.py --config configs/benchmarks/busi.yaml --seeds 0 1 2 --resume --online \
        --student-option epochs=100 --rows small compact    # online distillation -> deployment_busi_online_*

The table goes to results/deployment_<name>.{json,md} and Dice against GFLOPs per case to deployment_<name>.png.
Each finished seed's rows are written to its work folder (``rows.json``); ``--resume`` reads them back instead of
running the seed again, so seeds can be added one session at a time.

``--student-option KEY=VALUE`` changes the students' training (``nakt.train``'s keyword arguments, on top of the
config's) one change at a time: the teachers, the ensemble and the fused labels are the plain run's (read back from
its ``rows.json`` with ``--resume``), the students train into folders and rows of their own
(``student_<row>_<tag>``, ``rows_<tag>.json``) and the results go to deployment_<name>_<tag>.*, never over the
plain run's. ``--rows`` trains only some of the students (e.g. the two small ones of the deployment target).
``--online`` trains the students of the fused labels by online distillation instead (``nakt distill``: the
teachers run on each augmented batch, fused by ``nakt label``'s default rule), tagged ``online``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segmentation_transfer import ROOT, Bench, dataset_folder, load_config  # noqa: E402

import nakt  # noqa: E402
from nakt.cost import case_cost, onnx_latency  # noqa: E402
from nakt.fusion import default_fusion  # noqa: E402
from nakt.io.dataset import discover_cases  # noqa: E402
from nakt.machine import this_machine  # noqa: E402
from nakt.predict import load_checked  # noqa: E402
from nakt.recipes import stable_cases  # noqa: E402
from nakt.report import plot_accuracy_vs_cost  # noqa: E402

SMALL, COMPACT, LARGE = "smp:Linknet/mobilenet_v2", "monai:UNet", "smp:Unet/resnet34"
STUDENTS = {"small": SMALL, "compact": COMPACT, "large": LARGE}
ENSEMBLE = "ensemble (teachers fused, nakt label default)"
ROWS = {**{key: f"student {spec} (fused labels)" for key, spec in STUDENTS.items()},
        "semi": f"student {LARGE} (true masks + fused labels)",
        "semi_filtered": f"student {LARGE} (true masks + fused labels, disputed fifth dropped)"}


def cost_of(specs: list[str], case, onnx_run: Path | None = None) -> dict:
    cost = case_cost([load_checked(s, None, "auto") for s in specs], case, "auto")
    if onnx_run is not None:
        cost.onnx_latency_s = onnx_latency(onnx_run, case)
    return cost.to_json()


def run_seed(bench: Bench, seed: int, work: Path, done: dict | None = None, student_options: dict | None = None,
             students: tuple[str, ...] = tuple(ROWS), tag: str = "", online: bool = False) -> dict:
    """The rows of one seed; rows in `done` (an earlier run's, read back by --resume) are kept as measured and
    only the others are trained, scored and costed (their teachers and labels read from the work folder).
    `student_options` go to every student's training, `students` names the student rows (keys of `ROWS`) to
    run, and `tag` suffixes their run folders. `online`: the students of the fused labels learn instead from the
    teachers themselves, run on each augmented batch and fused per sample by `nakt label`'s default rule
    (``nakt distill --teacher-mode mean``): the same fused labels, on every view the augmentation makes."""
    done, student_options = done or {}, student_options or {}
    suffix = f"_{tag}" if tag else ""
    rows: dict[str, dict] = dict(done)  # finished rows of students not run now stay in the seed's rows
    costs: dict[str, tuple[list[str], Path | None]] = {}  # row -> (specs, ONNX run), measured after training

    def scored(row: str, run: Path, train: Callable[[], float | None], onnx: bool = False) -> None:
        if row in done:
            return
        train_s = train()
        rows[row] = {"dice": bench.evaluate(work / f"eval_{run.name}", hd95=False, model=str(run))["dice"],
                     "train_s": train_s}
        costs[row] = ([str(run)], run if onnx else None)

    def trained_on(spec: str, masks: str, split: str, run: Path, role: str, **options) -> Callable[[], float | None]:
        return lambda: bench.train(spec, masks, split, run, role, seed, **options)

    teachers = [work / f"teacher{i}" for i in range(len(bench.cfg["teachers"]))]
    for run, spec in zip(teachers, bench.cfg["teachers"]):
        scored(f"teacher {spec}", run, trained_on(spec, bench.masks, "teacher_train", run, "train", val=True))
    if ENSEMBLE not in done:
        test_labels = nakt.label(teacher=[str(t) for t in teachers], cases=bench.lists["test"],
                                 out=str(work / "labels_test"), overwrite=True, **bench.io)
        rows[ENSEMBLE] = {"dice": bench.evaluate(work / "eval_ensemble", hd95=False, pred=str(test_labels))["dice"]}
        costs[ENSEMBLE] = ([str(t) for t in teachers], None)
    labels, fused_row = work / "labels_transferal", "fused transferal labels (vs transferal truth)"
    if fused_row not in done:
        bench.label(teachers, None, labels)
        rows[fused_row] = {"dice": bench.label_dice(labels, work / "eval_labels")}
    targets, online_options = str(labels), {}
    if online:
        targets, online_options = None, {"teacher": [str(t) for t in teachers], "teacher_mode": "mean",
                                         "fusion": default_fusion("segmentation", len(teachers))}
    for key, spec in STUDENTS.items():
        if key in students:
            run = work / f"student_{key}{suffix}"
            scored(ROWS[key], run, trained_on(spec, targets, "transferal", run, "student_train", **online_options,
                                              **student_options), onnx=True)
    labelled = {"labelled_images": bench.io["images"], "labelled_masks": bench.masks,
                "labelled_cases": bench.lists["teacher_train"], "labelled_ratio": 0.5}
    kept = stable_cases(labels, None, work / "filter", drop_disputed=0.2)
    for key, cases in (("semi", bench.lists["transferal"]), ("semi_filtered", str(kept))):
        if key in students:
            run = work / f"student_{key}{suffix}"
            scored(ROWS[key], run, trained_on(LARGE, str(labels), "transferal", run, "student_train", cases=cases,
                                              **labelled, **student_options))
    test_case = discover_cases(bench.io["images"], cases=bench.lists["test"], channels=bench.io["channels"])[0]
    for row, (specs, onnx_run) in costs.items():
        rows[row]["cost"] = cost_of(specs, test_case, onnx_run)
    return rows


def read_rows(path: Path) -> dict:
    """A seed's finished rows (``rows.json``), or none."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def summarise(per_seed: dict) -> dict:
    """Per row: mean Dice, FLOPs, parameters and latencies over the seeds; the issue's ratios. A row some seeds
    lack (a student not yet run there) is left out of the means and named in ``partial_rows``."""
    first = list(next(iter(per_seed.values())))
    rows = [row for row in first if all(row in s for s in per_seed.values())]
    mean = {}
    for row in rows:
        entries = [s[row] for s in per_seed.values()]
        entry = {"dice": statistics.fmean(e["dice"] for e in entries)}
        if "cost" in entries[0]:
            for key in ("flops", "parameters", "latency_s", "onnx_latency_s"):
                values = [e["cost"][key] for e in entries if e["cost"].get(key) is not None]
                entry[key] = statistics.fmean(values) if values else None
        mean[row] = entry
    best_teacher = max((r for r in rows if r.startswith("teacher")), key=lambda r: mean[r]["dice"])
    ensemble = mean[ENSEMBLE]
    deployment = {}  # per small student run: the three conditions against the ensemble
    for key in ("small", "compact"):
        if ROWS[key] not in mean:
            continue
        student = mean[ROWS[key]]
        entry = {"dice_vs_ensemble": student["dice"] / ensemble["dice"],
                 "ensemble_flops_vs_student": ensemble["flops"] / student["flops"],
                 "faster_than_ensemble": student["latency_s"] < ensemble["latency_s"]}
        entry["met"] = (entry["dice_vs_ensemble"] >= 0.97 and entry["ensemble_flops_vs_student"] >= 5
                        and entry["faster_than_ensemble"])
        deployment[ROWS[key]] = entry
    checks = {"deployment": deployment, "deployment_target_met": any(e["met"] for e in deployment.values()),
              "best_teacher": best_teacher}
    semi = {key: mean[ROWS[key]]["dice"] - mean[best_teacher]["dice"] for key in ("semi", "semi_filtered")
            if ROWS[key] in mean}
    for key, gap in semi.items():
        checks[f"{key}_minus_best_teacher"] = gap
    if semi:
        checks["semi_target_met"] = max(semi.values()) >= 0
    partial = sorted({row for s in per_seed.values() for row in s} - set(rows))
    return {"mean": mean, "checks": checks, "partial_rows": partial}


def short_name(row: str) -> str:
    """A row's name for the plot: "Unet/resnet34, semi, filtered" for the semi-supervised student without the
    disputed fifth."""
    for long, short in ((ENSEMBLE, "ensemble"), ("student ", ""), ("smp:", ""), (" (fused labels)", ""),
                        (" (true masks + fused labels, disputed fifth dropped)", ", semi, filtered"),
                        (" (true masks + fused labels)", ", semi")):
        row = row.replace(long, short)
    return row


def markdown(result: dict) -> str:
    s = result["summary"]
    cell = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    changed = result.get("student_options")
    lines = [f"# Deployment students on {result['dataset']} ({result['mode']} mode, seeds {result['seeds']})", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']['cpu_model']}  ",
             f"Students' training changed: `{changed}`" if changed else "Students' training: the config's",
             *(["Students of the fused labels: online, from the teachers fused on each augmented batch  "]
               if result.get("online") else []), "",
             "| model | test Dice | parameters (M) | GFLOPs/case | latency ms (PyTorch) | latency ms (ONNX Runtime) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row, m in s["mean"].items():
        lines.append(f"| {row} | {m['dice']:.4f} | {cell(m.get('parameters') and m['parameters'] / 1e6, '.2f')} | "
                     f"{cell(m.get('flops') and m['flops'] / 1e9, '.3f')} | "
                     f"{cell(m.get('latency_s') and 1000 * m['latency_s'], '.1f')} | "
                     f"{cell(m.get('onnx_latency_s') and 1000 * m['onnx_latency_s'], '.1f')} |")
    c = s["checks"]
    lines.append("")
    if s.get("partial_rows"):
        lines.append(f"Left out, not run in every seed: {', '.join(s['partial_rows'])}.  ")
    for row, e in c["deployment"].items():
        lines.append(f"{row}: {e['dice_vs_ensemble']:.3f}x the ensemble's Dice with "
                     f"{e['ensemble_flops_vs_student']:.1f}x fewer FLOPs, faster than the ensemble: "
                     f"{e['faster_than_ensemble']}; deployment target (>= 0.97x, >= 5x, faster): "
                     f"{'met' if e['met'] else '**not met**'}.  ")
    if "semi_target_met" in c:
        gaps = ", ".join(f"{key.removesuffix('_minus_best_teacher')}: {c[key]:+.4f}"
                         for key in ("semi_minus_best_teacher", "semi_filtered_minus_best_teacher") if key in c)
        lines.append(f"Semi-supervised student - best teacher ({c['best_teacher']}): {gaps}; target (>= 0): "
                     f"{'met' if c['semi_target_met'] else '**not met**'}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--quick", action="store_true", help="1 seed, the config's quick sizes")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--data", help="dataset folder (default: the config's)")
    parser.add_argument("--max-cases", type=int, help="at most this many cases per split (smoke runs)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "benchmarks" / "deployment"))
    parser.add_argument("--out", help="results folder (default benchmarks/results, or its quick/ in quick mode)")
    parser.add_argument("--resume", action="store_true", help="read back the seeds finished in the work folder")
    parser.add_argument("--student-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a nakt.train option for every student (YAML value), e.g. patches_per_case=32; "
                             "repeatable; results to deployment_<name>_<tag>.*")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS),
                        help="the student rows to run (default all)")
    parser.add_argument("--online", action="store_true",
                        help="the students of the fused labels distil online from the teachers (fused per "
                             "augmented batch) instead of the stored label set; results to deployment_<name>_online*")
    args = parser.parse_args(argv)
    if args.online and not set(args.rows) <= set(STUDENTS):
        parser.error(f"--online trains the students of the fused labels: --rows {' '.join(STUDENTS)}")
    student_options = {}
    for item in args.student_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--student-option {item!r}: expected KEY=VALUE")
        student_options[key.replace("-", "_")] = yaml.safe_load(value)
    tag = "_".join((["online"] if args.online else []) + [f"{key}{value}" for key, value in student_options.items()])
    cfg = load_config(Path(args.config), args.quick)
    data = dataset_folder(args.data or cfg["data"], "deployment")
    seeds = args.seeds or ([0] if args.quick else cfg.get("seeds", [0, 1, 2]))
    mode = "quick" if args.quick else "full"
    command = " ".join(["python", "benchmarks/deployment.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.time()
    per_seed = {}
    for seed in seeds:
        work = Path(args.work) / cfg["name"] / mode / f"seed{seed}"
        finished = work / (f"rows_{tag}.json" if tag else "rows.json")
        done = read_rows(finished) if args.resume else {}
        if tag:  # the teachers, the ensemble and the fused labels: the plain run's, never trained over
            done = {**{row: v for row, v in read_rows(work / "rows.json").items() if row not in ROWS.values()},
                    **done}
        wanted = {ROWS[key] for key in args.rows}
        if not wanted <= set(done):  # a new seed, or rows added since: run what is missing
            per_seed[str(seed)] = run_seed(Bench(cfg, data, work, args.max_cases), seed, work, done,
                                           student_options, tuple(args.rows), tag, args.online)
            finished.write_text(json.dumps(per_seed[str(seed)], indent=1) + "\n", encoding="utf-8")
        else:
            per_seed[str(seed)] = done
        print(f"[seed {seed}] " + json.dumps({r: round(v["dice"], 4) for r, v in per_seed[str(seed)].items()}),
              flush=True)
    result = {"dataset": cfg["name"], "mode": mode, "command": command, "seeds": seeds, "config": cfg,
              "students": STUDENTS, "student_options": student_options, "online": args.online,
              "machine": this_machine().to_json(), "per_seed": per_seed, "summary": summarise(per_seed),
              "total_wall_s": time.time() - started}
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    name = f"deployment_{cfg['name']}" + (f"_{tag}" if tag else "")
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text(markdown(result), encoding="utf-8")
    points = [{"name": short_name(row), "accuracy": m["dice"],
               "measure": f"test Dice, mean of {len(seeds)} seed(s)",
               "cost": {"gflops": m.get("flops") and m["flops"] / 1e9}} for row, m in result["summary"]["mean"].items()]
    plot_accuracy_vs_cost(points, out / f"{name}.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
