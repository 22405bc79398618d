"""`nakt demo`: the whole pipeline on generated data: two teachers, fused labels, a smaller third-architecture
student, and a table of Dice on a held-out test split beside each model's cost per case."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import nakt
from nakt.config import at_least, check_device, check_options, option
from nakt.cost import case_cost
from nakt.io import outputs
from nakt.io.dataset import discover_cases
from nakt.io.rundir import write_json
from nakt.predict import load_checked

__all__ = ["DemoOptions", "cost_table", "demo", "make_synthetic_dataset"]

SPLITS = {"teacher_train": 32, "teacher_val": 8, "transferal": 48, "test": 16}
TEACHERS = {"teacher 1 (smp:Unet/resnet18)": "smp:Unet/resnet18", "teacher 2 (monai:SegResNet)": "monai:SegResNet"}
ENSEMBLE_ROW = "ensemble (both teachers, fused)"
STUDENT = "monai:UNet"
STUDENT_ROW = f"student ({STUDENT}, fused labels only)"


def make_synthetic_dataset(out: str | Path, size: int = 64, seed: int = 0, splits: dict | None = None) -> Path:
    """Write a 2D segmentation set: grey PNG images of noisy blobs on a shaded background, PNG masks (0/255),
    and ``splits.json``. Returns `out`."""
    from PIL import Image as PILImage

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    names: dict[str, list[str]] = {}
    index = 0
    for split, n in (splits or SPLITS).items():
        names[split] = []
        for _ in range(n):
            mask = np.zeros((size, size), bool)
            for _ in range(rng.integers(1, 3)):  # one or two ellipses
                cy, cx = rng.uniform(0.25, 0.75, 2)
                ry, rx = rng.uniform(0.08, 0.22, 2)
                angle = rng.uniform(0, np.pi)
                dy, dx = yy - cy, xx - cx
                u = dx * np.cos(angle) + dy * np.sin(angle)
                v = -dx * np.sin(angle) + dy * np.cos(angle)
                mask |= (u / rx) ** 2 + (v / ry) ** 2 <= 1
            shade = rng.uniform(40, 90) + 40 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))
            image = shade + mask * rng.uniform(50, 90) + rng.normal(0, 18, (size, size))
            name = f"case_{index:03d}"
            index += 1
            PILImage.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out / "images" / f"{name}.png")
            PILImage.fromarray((mask * 255).astype(np.uint8)).save(out / "masks" / f"{name}.png")
            names[split].append(name)
    (out / "splits.json").write_text(json.dumps(names, indent=1), encoding="utf-8")
    return out


@dataclass
class DemoOptions:
    """Options of `demo`: where to work (a new or empty folder, or an earlier demo's, which is replaced), and
    how long to train."""

    out: str = option("demo_runs", "working folder (new, empty, or an earlier demo's, which is replaced)",
                      group="output")
    epochs: int = option(20, "epochs each network trains", group="schedule")
    seed: int = option(0, cli=False)
    device: str = "auto"
    progress: bool = option(False, cli=False)

    def __post_init__(self) -> None:
        check_options(self, {"epochs": at_least(1), "seed": at_least(0), "device": check_device})


def demo(opts: DemoOptions | None = None) -> dict:
    """Run the pipeline on generated data and print each model's test Dice beside its cost per case (parameters,
    FLOPs, latency on this machine): two teachers, their ensemble as ``nakt label`` runs it (the fused labels
    of the test split), and a student of a third, smaller architecture that learnt from the fused labels of
    the transferal split alone. Returns ``{row: {"dice", "cost"}}`` and writes it to ``out/results.json``."""
    opts = opts or DemoOptions()
    work = Path(opts.out)
    outputs.claim_output(work, outputs.DEMO, overwrite=True)  # an earlier demo is replaced; nothing else is
    write_json(work / outputs.DEMO.marker, {"format": "nakt.demo/1", "nakt_version": nakt.__version__})
    data = make_synthetic_dataset(work / "data", seed=opts.seed)
    splits = data / "splits.json"
    common = dict(images=str(data / "images"), size=[64], epochs=opts.epochs, batch_size=8, seed=opts.seed,
                  device=opts.device, progress=opts.progress)
    started = time.time()
    runs = {}
    for i, (row, spec) in enumerate(TEACHERS.items(), 1):
        print(f"training {row} ...", flush=True)
        runs[row] = nakt.train(model=spec, masks=str(data / "masks"), out=str(work / f"teacher{i}"),
                               cases=f"{splits}:teacher_train", val_images=str(data / "images"),
                               val_masks=str(data / "masks"), val_cases=f"{splits}:teacher_val", lr=3e-3,
                               **common)
    print("labelling the transferal and test splits with both teachers (weighted fusion) ...", flush=True)
    labels = {split: nakt.label(teacher=[str(r) for r in runs.values()], images=str(data / "images"),
                                cases=f"{splits}:{split}", out=str(work / f"labels_{split}"), fusion="weighted",
                                device=opts.device, progress=opts.progress)
              for split in ("transferal", "test")}
    print(f"training {STUDENT_ROW} ...", flush=True)
    student = nakt.train(model=STUDENT, masks=str(labels["transferal"]), out=str(work / "student"),
                         cases=f"{splits}:transferal", lr=1e-2, **common)
    print("scoring on the test split and measuring each model's cost per case ...", flush=True)
    case = discover_cases(str(data / "images"), cases=f"{splits}:test")[0]  # the case each cost is measured on
    results = {}
    for row, members in {**{r: [run] for r, run in runs.items()}, ENSEMBLE_ROW: list(runs.values()),
                         STUDENT_ROW: [student]}.items():
        # the ensemble is scored by its fused test labels, and costs its teachers as nakt label runs them
        source = {"pred": str(labels["test"])} if row == ENSEMBLE_ROW else {"model": str(members[0])}
        summary = nakt.evaluate(images=str(data / "images"), masks=str(data / "masks"), cases=f"{splits}:test",
                                out=str(work / "eval" / (Path(members[0]).name if len(members) == 1 else "ensemble")),
                                device=opts.device, hd95=False, progress=opts.progress, **source)
        cost = case_cost([load_checked(str(m), None, opts.device) for m in members], case, "auto")
        results[row] = {"dice": summary["mean"]["dice"], "cost": cost.to_json()}
    write_json(work / "results.json", results)
    print("\n" + cost_table(results, ENSEMBLE_ROW))
    best = max(results[row]["dice"] for row in runs)
    ratio = results[STUDENT_ROW]["cost"]["flops"] / results[ENSEMBLE_ROW]["cost"]["flops"]
    print(f"\nThe student reaches {results[STUDENT_ROW]['dice'] / best:.2f}x the best teacher's Dice at "
          f"{ratio:.2f}x the ensemble's FLOPs ({1 / ratio:.1f}x fewer).")
    print(f"({len(SPLITS)} splits of generated 64x64 images, {opts.epochs} epochs each, {time.time() - started:.0f} "
          f"s; outputs in {work}/)")
    return results


def cost_table(results: dict, reference: str) -> str:
    """A plain-text table of `results` (``{row: {"dice", "cost"}}``): Dice, parameters, GFLOPs and latency per
    case, and FLOPs relative to the `reference` row."""
    header = ["model", "test Dice", "parameters", "GFLOPs/case", "x " + reference.split(" (")[0] + " FLOPs",
              "latency ms"]
    base = results[reference]["cost"]["flops"]
    lines = [[row, f"{r['dice']:.3f}", f"{r['cost']['parameters'] / 1e6:.2f} M", f"{r['cost']['gflops']:.3f}",
              f"{r['cost']['flops'] / base:.2f}", f"{r['cost']['latency_ms']:.1f}"] for row, r in results.items()]
    widths = [max(len(x) for x in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(f"{x:<{w}}" if i == 0 else f"{x:>{w}}" for i, (x, w) in enumerate(zip(line, widths)))
                     for line in [header, *lines])
