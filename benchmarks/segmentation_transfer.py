"""Segmentation transfer benchmark: do the method's claims hold on real data?

For one dataset (images/, masks/, splits.json with teacher_train, teacher_val, transferal, finetune, test) and
each seed: train teachers of different families; label the transferal split with each teacher alone and with
all of them fused by each fusion rule; train a student of another architecture on every label set; fine-tune
the multi-teacher student on the finetune split; run the same-budget baselines (the student from scratch on
the finetune split, a teacher fine-tuned on it, and the student on the transferal split's true masks); score
everything on the test split. The student is also distilled online (``nakt distill``: the teachers run on
its own augmented batches, fused per sample by the mean), with the same validation cases as the offline
students (the mean-fused label set's masks; ``alpha=1``: its probabilities do not enter the loss).
Writes ``<out>/<dataset>.json`` (every number, config, seeds, wall times, machine) and ``<out>/<dataset>.md``
(a table). ``--online-only`` runs just the teachers, the offline mean-fused student and the online one, into
``<dataset>_online.json`` / ``.md``; ``--recipe-only`` just the teachers, the single-teacher students and the
students of the default fusion and the config's ``recipe:`` variants (claim 2), into ``<dataset>_recipe.*``.

    python benchmarks/segmentation_transfer.py --config configs/benchmarks/cxr_lungs.yaml [--quick] [--recipe-only]

Only nakt's public API is used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

import nakt
from nakt.fusion import FUSIONS, default_fusion

ROOT = Path(__file__).resolve().parents[1]


def load_config(path: Path, quick: bool) -> dict:
    """The YAML config, with its ``quick:`` section merged over it in quick mode."""
    cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    overrides = cfg.pop("quick", {}) if quick else {}
    cfg.pop("quick", None)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    check_variants(cfg, path)
    return cfg


VARIANT_KEYS = ("name", "fusion", "label", "train", "teacher", "self_training", "truth")


def check_variants(cfg: dict, path: Path) -> None:
    """Exit with one line naming the config and the entry when a ``variants:`` or ``recipe:`` entry has no name,
    a key this script does not know (a typo would otherwise run the default fusion under the variant's name), an
    unknown fusion rule or a teacher index out of range."""
    for section in ("variants", "recipe"):
        for i, variant in enumerate(cfg.get(section) or []):
            where = f"segmentation_transfer: {path}: {section}[{i}]"
            if not isinstance(variant, dict) or not variant.get("name"):
                sys.exit(f"{where}: every entry needs a name")
            unknown = sorted(set(variant) - set(VARIANT_KEYS))
            if unknown:
                sys.exit(f"{where} ({variant['name']}): unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(VARIANT_KEYS)}")
            if variant.get("fusion") is not None and variant["fusion"] not in FUSIONS:
                sys.exit(f"{where} ({variant['name']}): unknown fusion {variant['fusion']!r}; "
                         f"known: {', '.join(FUSIONS)}")
            if "teacher" in variant and variant["teacher"] not in range(len(cfg.get("teachers", []))):
                sys.exit(f"{where} ({variant['name']}): teacher {variant['teacher']!r} is not an index of the "
                         f"{len(cfg.get('teachers', []))} teachers")


def prepare_brats_slices(source: Path, dest: Path, step: int = 3, min_brain: float = 0.05) -> Path:
    """brats6 (3D case folders) -> 2D axial slices in the standard layout, split by subject.

    Each slice is a case folder with ``flair.tif`` and ``t1c.tif`` (float32) and a mask ``masks/<case>.png``
    (labels 0-4). Splits: train subjects -> teacher_train, the first validation subject -> teacher_val, the
    second -> transferal (every fifth of its slices -> finetune), test subjects -> test.
    """
    import nibabel as nib
    import numpy as np
    from PIL import Image

    if (dest / "splits.json").is_file():
        return dest
    splits = {k: [] for k in ("teacher_train", "teacher_val", "transferal", "finetune", "test")}
    subjects = [(split, p) for split in ("train", "validation", "test") for p in sorted((source / split).iterdir())]
    for split, subject in subjects:
        vols = {name: np.asarray(nib.load(str(next(subject.glob(f"{name}*")))).dataobj, dtype=np.float32)
                for name in ("Flair", "T1c", "OTMultiClass", "brainmask")}
        kept = [k for k in range(0, vols["Flair"].shape[2], step) if vols["brainmask"][:, :, k].mean() > min_brain]
        for i, k in enumerate(kept):
            case = f"{subject.name}_z{k:03d}"
            (dest / "images" / case).mkdir(parents=True, exist_ok=True)
            (dest / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(vols["Flair"][:, :, k]).save(dest / "images" / case / "flair.tif")
            Image.fromarray(vols["T1c"][:, :, k]).save(dest / "images" / case / "t1c.tif")
            Image.fromarray(vols["OTMultiClass"][:, :, k].astype(np.uint8)).save(dest / "masks" / f"{case}.png")
            if split == "train":
                splits["teacher_train"].append(case)
            elif split == "test":
                splits["test"].append(case)
            elif subject.name == sorted(p.name for p in (source / "validation").iterdir())[0]:
                splits["teacher_val"].append(case)
            else:
                splits["finetune" if i % 5 == 0 else "transferal"].append(case)
    (dest / "splits.json").write_text(json.dumps(splits, indent=1), encoding="utf-8")
    return dest


def dataset_folder(path: str, script: str) -> Path:
    """The dataset folder, relative to the working directory or else to the project root; exits if missing."""
    data = Path(path)
    if not data.is_absolute() and not data.exists():
        data = ROOT / data
    if not data.is_dir():
        sys.exit(f"{script}: {data}: dataset folder not found")
    return data


def folder_name(row: str) -> str:
    """A row's name as a folder name: ``student <- fused vote, x`` -> ``fused_vote__x``."""
    name = row.replace("student <- ", "")
    for char in " :/,=<>.":
        name = name.replace(char, "_")
    return name


def trained_as(run: Path, options: dict) -> bool:
    """True if `run` is a finished nakt run whose training record matches `options` (``nakt.train``'s keyword
    arguments; paths compared resolved; options the record does not hold, such as ``progress``, are ignored)."""
    path = Path(run) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text(encoding="utf-8"))
    record = config.get("training", {})

    def same(recorded, given) -> bool:
        if isinstance(recorded, str) and isinstance(given, str) and Path(given).exists():
            return Path(recorded).resolve() == Path(given).resolve()
        return recorded == given

    return config.get("complete") is True and "model" in record and \
        all(same(record[key], value) for key, value in options.items() if key in record)


class Bench:
    """One dataset's benchmark: shared paths and options, and one method per pipeline stage."""

    def __init__(self, cfg: dict, data: Path, work: Path, max_cases: int | None, reuse_teachers: bool = False):
        self.cfg, self.data, self.work, self.reuse_teachers = cfg, data, work, reuse_teachers
        splits = json.loads((data / "splits.json").read_text(encoding="utf-8"))
        self.lists = {}
        for split in ("teacher_train", "teacher_val", "transferal", "finetune", "test"):
            cases = splits[split][:max_cases] if max_cases else splits[split]
            path = work / "cases" / f"{split}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(cases) + "\n", encoding="utf-8")
            self.lists[split] = str(path)
        self.io = {"images": str(data / "images"), "channels": cfg.get("channels"), "progress": False}
        self.masks = str(data / "masks")

    def _train_options(self, role: str, seed: int) -> dict:
        return {**self.cfg.get("train", {}), **self.cfg.get(role, {}), "seed": seed}

    def train(self, spec: str, masks: str, split: str, out: Path, role: str, seed: int, val: bool = False,
              reuse: bool = False, **options) -> float | None:
        """Train `spec` into `out`; returns the wall seconds, or None when `reuse` and `out` already holds a
        finished run trained with these very options (kept, not trained again)."""
        started = time.time()
        extra = {"val_images": self.io["images"], "val_masks": self.masks, "val_cases": self.lists["teacher_val"]} \
            if val else {}
        options = {"model": spec, "masks": masks, "cases": self.lists[split], **self.io, **extra,
                   **self._train_options(role, seed), **options}
        if reuse and trained_as(out, options):
            return None
        nakt.train(out=str(out), overwrite=True, **options)
        return time.time() - started

    def finetune(self, run: Path, out: Path, seed: int) -> float:
        started = time.time()
        nakt.finetune(model=str(run), masks=self.masks, cases=self.lists["finetune"], out=str(out), overwrite=True,
                      **self.io, **self.cfg.get("finetune", {}), seed=seed)
        return time.time() - started

    def label(self, teachers: list[Path], fusion: str, out: Path, **options) -> float:
        started = time.time()
        nakt.label(teacher=[str(t) for t in teachers], cases=self.lists["transferal"], out=str(out), fusion=fusion,
                   overwrite=True, **self.io, **options)
        return time.time() - started

    def label_dice(self, labels: Path, out: Path) -> float:
        """Dice of a label set's masks against the transferal split's truth."""
        return self.evaluate(out, split="transferal", hd95=False, pred=str(labels / "masks"))["dice"]

    def self_training(self, teachers: list[Path], variant: dict, out: Path, seed: int) -> list[float]:
        """A recipe variant's noisy-student rounds (``nakt.recipes.self_training``) into `out`, started afresh;
        returns each round's wall seconds (labeling + training)."""
        from nakt.recipes import self_training

        if out.is_dir():  # this benchmark's own folder: a stale round would be kept as finished
            shutil.rmtree(out)
        options = {"channels": self.io["channels"]}
        walls, started = [], time.time()
        for rounds in range(1, variant["self_training"]["rounds"] + 1):  # one round more per call: the
            # finished ones are kept, so each call times one round
            self_training([str(t) for t in teachers], self.io["images"], self.cfg["student"], str(out), rounds,
                          fusion=variant.get("fusion"), cases=self.lists["transferal"], progress=False,
                          label_options={**options, **variant.get("label", {})},
                          train_options={**options, **self._train_options("student_train", seed),
                                         **variant.get("train", {})})
            walls.append(time.time() - started - sum(walls))
        return walls

    def evaluate(self, out: Path, split: str = "test", hd95: bool = True, **source) -> dict:
        roi = str(self.data / self.cfg["roi"]) if self.cfg.get("roi") else None
        summary = nakt.evaluate(masks=self.masks, cases=self.lists[split], out=str(out), roi=roi, hd95=hd95,
                                overwrite=True, **self.io, **source)
        return summary["mean"]


def run_seed(bench: Bench, seed: int, online_only: bool = False, recipe_only: bool = False,
             done: dict | None = None) -> dict:
    """Every row of the table for one seed: ``{row: {"dice", "hd95", "wall_s", ...}}``. ``recipe_only``: the
    teachers, the single-teacher students, the student of ``nakt label``'s default fusion and the config's
    ``recipe:`` variants (claim 2 alone). ``done``: rows of this seed measured before (recipe-only resume), kept
    as they are; the teachers are trained again only when some other row needs them."""
    cfg, work = bench.cfg, bench.work / f"seed{seed}"
    rows: dict[str, dict] = {}
    done = done or {}

    def log(row: str) -> None:
        r = rows[row]
        label = f"  labels vs truth {r['label_dice']:.3f}" if "label_dice" in r else ""
        wall = "kept from an earlier run" if r["wall_s"] is None else f"{r['wall_s']:.0f} s"
        print(f"[seed {seed}] {row}: Dice {r['dice']:.4f}{label}  ({wall})", flush=True)

    # row -> (teacher indices, fusion, label options, student training options); fusion None: nakt label's default
    everyone = list(range(len(cfg["teachers"])))
    singles = {f"student <- {spec}": ([i], "mean", {}, {}) for i, spec in enumerate(cfg["teachers"])}
    default = default_fusion("segmentation", len(everyone))
    noisy: dict[str, tuple] = {}  # noisy-student variants: row of the last round -> (variant, its round rows)
    truths: dict[str, dict] = {}  # `truth: true` variants: the student on the transferal truth -> training options
    if online_only:
        label_sets, variants = {"student <- fused mean": (everyone, "mean", {}, {})}, []
    elif recipe_only:
        label_sets = {**singles, f"student <- fused {default} (the default)": (everyone, None, {}, {})}
        variants = cfg.get("recipe", [])
    else:
        fused = {f"student <- fused {f}": (everyone, f, {}, {}) for f in cfg.get("fusions", ["mean"])}
        label_sets = {**singles, **fused}
        label_sets.setdefault("student <- fused mean", (everyone, "mean", {}, {}))  # the online student's reference
        variants = cfg.get("variants", [])  # what the method allows when a claim fails
    for variant in variants:
        fusion, label_options, train_options = variant.get("fusion"), variant.get("label", {}), variant.get("train", {})
        if variant.get("truth"):  # the student's own ceiling: no label set can teach it more than the truth
            truths[f"upper bound: {cfg['student']} on transferal true masks, {variant['name']}"] = train_options
        elif "teacher" in variant:  # one teacher's labels, trained as the variant says (a control for the others)
            row = f"student <- {cfg['teachers'][variant['teacher']]}, {variant['name']}"
            label_sets[row] = ([variant["teacher"]], "mean", label_options, train_options)
        elif "self_training" in variant:
            rounds = [f"student <- fused {fusion or default}, {variant['name']}, round {r}"
                      for r in range(variant["self_training"]["rounds"])]
            noisy[rounds[-1]] = (variant, rounds)
        else:
            label_sets[f"student <- fused {fusion or default}, {variant['name']}"] = (
                everyone, fusion, label_options, train_options)
    wanted = [*(f"teacher {spec}" for spec in cfg["teachers"]), *label_sets,
              *(row for _, rounds in noisy.values() for row in rounds), *truths]
    if all(row in done for row in wanted):
        return {row: done[row] for row in wanted}

    teachers = []
    for i, spec in enumerate(cfg["teachers"]):
        run, row = work / f"teacher{i}", f"teacher {spec}"
        # --reuse-teachers: a kept row's teacher still in the work folder, trained as the config says, serves again
        wall = bench.train(spec, bench.masks, "teacher_train", run, "teacher_train", seed, val=True,
                           reuse=bench.reuse_teachers and row in done)
        teachers.append(run)
        rows[row] = {**bench.evaluate(work / f"eval_teacher{i}", model=str(run)), "wall_s": wall}
        log(row)
        if row in done:  # the kept row stays; the new rows' teacher is recorded beside it
            if abs(done[row]["dice"] - rows[row]["dice"]) > 1e-4:
                how = "the teacher kept in the work folder scores" if wall is None else "retrained, it scores"
                print(f"[seed {seed}] warning: {row} scored {done[row]['dice']:.4f} in the kept results; "
                      f"{how} {rows[row]['dice']:.4f} (training is not reproducible across thread counts)",
                      flush=True)
            rows[row] = {**done[row], "retrained_dice": rows[row]["dice"]}

    def score_student(row: str, name: str, run: Path, labels: Path, wall: float) -> None:
        """A student's row: its test scores and its label set's Dice against the transferal truth."""
        rows[row] = {**bench.evaluate(work / f"eval_student_{name}", model=str(run)), "wall_s": wall,
                     "label_dice": bench.label_dice(labels, work / f"eval_labels_{name}")}
        log(row)

    student = cfg["student"]
    for row, (members, fusion, label_options, train_options) in label_sets.items():
        if row in done:
            rows[row] = done[row]
            continue
        name = folder_name(row)
        labels = work / f"labels_{name}"
        label_wall = bench.label([teachers[i] for i in members], fusion, labels, **label_options)
        run = work / f"student_{name}"
        wall = bench.train(student, str(labels), "transferal", run, "student_train", seed, **train_options)
        score_student(row, name, run, labels, wall + label_wall)
    for variant, rounds in noisy.values():
        if all(row in done for row in rounds):
            rows.update({row: done[row] for row in rounds})
            continue
        out = work / f"selftrain_{folder_name(rounds[-1])}"
        for r, (row, wall) in enumerate(zip(rounds, bench.self_training(teachers, variant, out, seed))):
            folder = out / f"round_{r}"
            score_student(row, f"{out.name}_round_{r}", folder / "student", folder / "labels", wall)

    def score(row: str, name: str, wall: float) -> None:
        """A row of a model trained into ``work / name`` (not from a label set): its test scores."""
        rows[row] = {**bench.evaluate(work / f"eval_{name}", model=str(work / name)), "wall_s": wall}
        log(row)

    for row, train_options in truths.items():
        if row in done:
            rows[row] = done[row]
            continue
        name = f"student_{folder_name(row)}"
        score(row, name, bench.train(student, bench.masks, "transferal", work / name, "student_train", seed,
                                     **train_options))
    if recipe_only:
        return {row: rows[row] for row in wanted}

    score("student <- online teachers (distill, fused mean per batch)", "student_online",
          bench.train(student, str(work / "labels_fused_mean"), "transferal", work / "student_online",
                      "student_train", seed, teacher=[str(t) for t in teachers], teacher_mode="mean", alpha=1.0))
    if online_only:
        return rows

    fused = cfg.get("finetune_from", "weighted")
    score(f"student <- fused {fused} + finetune", "student_ft",
          bench.finetune(work / f"student_fused_{fused}", work / "student_ft", seed))
    score(f"baseline: {student} from scratch on finetune split", "baseline_scratch",
          bench.train(student, bench.masks, "finetune", work / "baseline_scratch", "scratch_train", seed))
    score(f"baseline: transfer learning ({cfg['teachers'][0]} fine-tuned on finetune split)", "baseline_tl",
          bench.finetune(teachers[0], work / "baseline_tl", seed))
    score(f"upper bound: {student} on transferal true masks", "student_truth",
          bench.train(student, bench.masks, "transferal", work / "student_truth", "student_train", seed))
    return rows


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Mean and standard deviation over seeds of each row's numbers (a row added by a later ``--resume`` may
    not have every seed yet: ``seeds`` says how many it has)."""
    table = {}
    order = max(per_seed.values(), key=len)
    for row in order:
        entry = {"per_seed": {str(s): per_seed[s][row] for s in per_seed if row in per_seed[s]}}
        entry["seeds"] = len(entry["per_seed"])
        for key in ("dice", "hd95", "wall_s", "label_dice"):
            values = [r[key] for r in entry["per_seed"].values() if r.get(key) is not None]
            if values:
                entry[f"{key}_mean"] = statistics.fmean(values)
                entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table[row] = entry
    return table


def markdown(name: str, result: dict) -> str:
    seeds = len(result["seeds"])
    planned = len(result.get("seeds_planned", result["seeds"]))
    done = f"{seeds} seed(s)" if seeds == planned else f"{seeds} of {planned} seeds done"
    lines = [f"# {name}: segmentation transfer ({result['mode']} mode, {done}, {result['machine']['device']})",
             "", f"Command: `{result['command']}`  ",
             *([f"Human reference row recomputed by: `{result['reference_command']}`  "]
               if "reference_command" in result else []),
             f"Total wall time: {result['total_wall_s'] / 60:.1f} min", "",
             "| row | test Dice (mean ± std) | test HD95 | labels vs transferal truth (Dice) | wall time (s) |",
             "| --- | --- | --- | --- | --- |"]
    for row, e in result["rows"].items():
        hd = f"{e['hd95_mean']:.2f}" if e.get("hd95_mean") is not None else "-"
        lab = f"{e['label_dice_mean']:.4f}" if "label_dice_mean" in e else "-"
        wall = f"{e['wall_s_mean']:.0f}" if "wall_s_mean" in e else "-"
        partial = f" ({e['seeds']} of {seeds} seeds)" if e.get("seeds", seeds) < seeds else ""
        lines.append(f"| {row}{partial} | {e['dice_mean']:.4f} ± {e['dice_std']:.4f} | {hd} | {lab} | {wall} |")
    return "\n".join(lines) + "\n"


HUMAN_ROW = "human: second observer vs first"


def human_row(scores: dict) -> dict:
    return {"dice_mean": scores["dice"], "dice_std": 0.0, "hd95_mean": scores["hd95"]}


def machine(device: str) -> dict:
    import torch

    used = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "nakt": nakt.__version__,
            "device": torch.cuda.get_device_name() if used == "cuda" else f"CPU ({os.cpu_count()} cores)"}


def finished_seeds(path: Path, mode: str, cfg: dict, online_only: bool, recipe_only: bool = False
                   ) -> tuple[dict[int, dict], float]:
    """``({seed: rows}, wall seconds)`` of an earlier results file of the same mode and config (online- and
    recipe-only runs: the same options their rows depend on), else ``({}, 0)``. Recipe-only runs keep the rows
    of the recipe variants that did not change, so that adding a variant runs just its rows."""
    if not path.is_file():
        return {}, 0.0
    earlier = json.loads(path.read_text(encoding="utf-8"))
    keys = ("teachers", "student", "train", "student_train") if online_only or recipe_only else tuple(cfg)
    if earlier.get("mode") != mode or any(earlier["config"].get(k) != cfg.get(k) for k in keys):
        print(f"--resume: {path} was made with another mode or config; every seed runs again", flush=True)
        return {}, 0.0
    before, now = earlier["config"].get("recipe", []), cfg.get("recipe", [])
    changed = [v["name"] for v in before + now if not (v in before and v in now)] if recipe_only else []

    def kept(row: str) -> bool:
        return not any(f", {name}" in row for name in changed)

    return ({int(s): {row: entry["per_seed"][s] for row, entry in earlier["rows"].items()
                      if s in entry.get("per_seed", {}) and kept(row)}  # the human row has no seeds
             for s in map(str, earlier["seeds"])}, earlier["total_wall_s"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/benchmarks/<dataset>.yaml")
    parser.add_argument("--data", help="dataset folder (default: the config's data:)")
    parser.add_argument("--quick", action="store_true", help="one seed, small sizes, few epochs")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the config's seeds (quick: the first)")
    parser.add_argument("--max-cases", type=int, help="use at most this many cases per split (smoke tests)")
    parser.add_argument("--work", help="folder for runs and label sets (default: runs/benchmarks[/quick]/<dataset>)")
    parser.add_argument("--out", help="folder for <dataset>.json and .md (default: benchmarks/results[/quick])")
    parser.add_argument("--online-only", action="store_true",
                        help="only the teachers and the offline and online mean-fused students")
    parser.add_argument("--recipe-only", action="store_true",
                        help="only the teachers, the single-teacher students, the student of the default fusion and "
                             "the config's recipe: variants (claim 2)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the seeds already in this run's results file (same mode and config); run the rest")
    parser.add_argument("--reuse-teachers", action="store_true",
                        help="with --resume: a kept teacher row's run still in the work folder, finished and trained "
                             "with the same options, labels the new rows instead of being trained again")
    parser.add_argument("--reference-only", action="store_true",
                        help="recompute only the human-reference row of existing results (no training)")
    args = parser.parse_args(argv)

    cfg = load_config(Path(args.config), args.quick)
    name = cfg["name"]
    if args.reuse_teachers and not args.resume:
        sys.exit("segmentation_transfer: --reuse-teachers: only with --resume (it reuses the kept rows' teachers)")
    if args.online_only and args.recipe_only:
        sys.exit("segmentation_transfer: --online-only and --recipe-only each run a part of the table; give one")
    # a part of the table must not replace the whole
    stem = name + ("_online" if args.online_only else "_recipe" if args.recipe_only else "")
    data = dataset_folder(args.data or cfg["data"], "segmentation_transfer")
    # quick runs get their own folder: sharing one would overwrite a full run's seed 0
    work = Path(args.work or ROOT / "runs" / "benchmarks" / ("quick" if args.quick else "") / stem)
    if cfg.get("prepare") == "brats_slices":
        data = prepare_brats_slices(data, work / "prepared")
    seeds = args.seeds or (cfg.get("seeds", [0])[:1] if args.quick else cfg.get("seeds", [0, 1, 2]))
    bench = Bench(cfg, data, work, args.max_cases, reuse_teachers=args.reuse_teachers)
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/segmentation_transfer.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.time()
    human = None
    if cfg.get("human_reference"):  # a second annotator against the first: the human-level reference
        human = bench.evaluate(work / "eval_human", pred=str(data / cfg["human_reference"]))
    if args.reference_only:
        result = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        if human is not None:
            result["rows"][HUMAN_ROW] = human_row(human)
        result["reference_command"] = command
        (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        (out / f"{name}.md").write_text(markdown(name, result), encoding="utf-8")
        return result
    mode = ("quick" if args.quick else "full") + (", online-only" if args.online_only else "") \
        + (", recipe-only" if args.recipe_only else "")
    per_seed, earlier_wall = finished_seeds(out / f"{stem}.json", mode, cfg, args.online_only, args.recipe_only) \
        if args.resume else ({}, 0.0)
    result = None
    for seed in seeds:  # results are rewritten after every seed, so an interrupted run keeps what it finished
        kept = per_seed.get(seed)
        if kept is not None and not args.recipe_only:
            print(f"[seed {seed}] kept from {out / f'{stem}.json'}", flush=True)
            continue
        per_seed[seed] = run_seed(bench, seed, args.online_only, args.recipe_only, done=kept)
        if per_seed[seed] == kept:
            print(f"[seed {seed}] kept from {out / f'{stem}.json'}", flush=True)
            continue
        rows = aggregate(per_seed)
        if human is not None:
            rows[HUMAN_ROW] = human_row(human)
        result = {"dataset": name, "data": str(data), "mode": mode,
                  "seeds": list(per_seed), "seeds_planned": seeds, "config": cfg, "command": command,
                  "machine": machine(cfg.get("train", {}).get("device", "auto")),
                  "total_wall_s": earlier_wall + time.time() - started, "rows": rows}
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        (out / f"{stem}.md").write_text(markdown(name, result), encoding="utf-8")
    if result is None:
        print(f"every seed was kept; {out / f'{stem}.json'} is unchanged", flush=True)
        return json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))
    print(markdown(name, result))
    return result


if __name__ == "__main__":
    main()
