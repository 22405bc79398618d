"""`nakt demo`: the whole pipeline on generated data: two teachers, fused labels, a third-architecture
student, and a Dice table on a held-out test split."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import nakt
from nakt.config import at_least, check_device, check_options, option
from nakt.io import outputs
from nakt.io.rundir import write_json

__all__ = ["DemoOptions", "demo", "make_synthetic_dataset"]

SPLITS = {"teacher_train": 32, "teacher_val": 8, "transferal": 48, "test": 16}


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
    """Run the pipeline on generated data and print the Dice table; returns ``{row: test Dice}``."""
    opts = opts or DemoOptions()
    work = Path(opts.out)
    outputs.claim_output(work, outputs.DEMO, overwrite=True)  # an earlier demo is replaced; nothing else is
    write_json(work / outputs.DEMO.marker, {"format": "nakt.demo/1", "nakt_version": nakt.__version__})
    data = make_synthetic_dataset(work / "data", seed=opts.seed)
    splits = data / "splits.json"
    common = dict(images=str(data / "images"), size=[64], epochs=opts.epochs, batch_size=8, seed=opts.seed,
                  device=opts.device, progress=opts.progress)
    started = time.time()
    teachers = {"teacher 1 (smp:Unet/resnet18)": "smp:Unet/resnet18", "teacher 2 (monai:UNet)": "monai:UNet"}
    runs = {}
    for i, (row, spec) in enumerate(teachers.items(), 1):
        print(f"training {row} ...", flush=True)
        runs[row] = nakt.train(model=spec, masks=str(data / "masks"), out=str(work / f"teacher{i}"),
                               cases=f"{splits}:teacher_train", val_images=str(data / "images"),
                               val_masks=str(data / "masks"), val_cases=f"{splits}:teacher_val", lr=3e-3,
                               **common)
    print("labelling the transferal split with both teachers (weighted fusion) ...", flush=True)
    labels = nakt.label(teacher=[str(r) for r in runs.values()], images=str(data / "images"),
                        cases=f"{splits}:transferal", out=str(work / "labels"), fusion="weighted",
                        progress=opts.progress)
    row = "student (smp:FPN/mobilenet_v2, fused labels only)"
    print(f"training {row} ...", flush=True)
    runs[row] = nakt.train(model="smp:FPN/mobilenet_v2", masks=str(labels), out=str(work / "student"),
                           cases=f"{splits}:transferal", lr=3e-3, **common)
    results = {}
    for row, run in runs.items():
        summary = nakt.evaluate(model=str(run), images=str(data / "images"), masks=str(data / "masks"),
                                cases=f"{splits}:test", out=str(work / "eval" / Path(run).name),
                                progress=opts.progress)
        results[row] = summary["mean"]["dice"]
    width = max(map(len, results))
    print(f"\n{'model':<{width}}  test Dice")
    for row, dice in results.items():
        print(f"{row:<{width}}  {dice:.3f}")
    print(f"\n({len(SPLITS)} splits of generated 64x64 images, {opts.epochs} epochs each, "
          f"{time.time() - started:.0f} s; outputs in {work}/)")
    return results
