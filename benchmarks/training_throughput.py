"""Training throughput: ``nakt train`` against a plain PyTorch loop, on ../shared/data/cxr_lungs.

One script run, the same model (smp U-Net/ResNet-18), batch (8), image size and epochs for everything:

- images/s of ``nakt.train`` with its defaults (``--precision auto``: bf16 on CPUs that compute it natively;
  DataLoader workers; prepared images cached) and with ``--precision fp32``, against a plain fp32 loop written
  below on tensors prepared beforehand (the same preprocessing, flips and intensity jitter, AdamW with the same
  one-cycle schedule, the same soft Dice + cross-entropy loss); the final validation Dice of each, per seed.
  Training images/s leave validation out (nakt's metrics.json records ``val_seconds`` per epoch);
- data-pipeline overhead: nakt's training images/s against the plain loop at nakt's own precision on the
  prepared tensors (pure compute), the median over seeds;
- with ``--compile``, ``nakt train --compile`` (Inductor; its first epoch compiles the training step): images/s
  over the whole run and after the first epoch, and the run length from which compiling pays (`compile_summary`);
- peak memory of a fresh ``nakt train`` process at 1x and 10x the training cases (symlinked copies), with the
  default cache and with a cache smaller than the set: the process's own peak RSS (VmHWM; ``ru_maxrss`` is no
  use here, since after fork + exec it starts from the parent's RSS) and the peak PSS of the process and its
  DataLoader workers together (sampled every 0.2 s; shared pages counted once).

Writes ``benchmarks/results/training_throughput_<kind>.json`` and ``.md``, one pair per machine kind
(`result_name`: the CPU's ISA level, or ``cuda``: everything on the GPU, the memory runs left out since they
measure the CPU process), so that one kind's results never overwrite another's.

    python benchmarks/training_throughput.py [--quick] [--device cuda] [--compile] [--work runs/training_throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

import nakt
from nakt.inference import autocast, cpu_has_bf16, resolve_precision
from nakt.io import rundir
from nakt.io.images import read_image, read_mask
from nakt.machine import this_machine
from nakt.metrics import case_scores
from nakt.models import ModelCard, build_model
from nakt.preprocess import encode_labels, one_hot, prepare_image, resize
from nakt.train.losses import SoftDiceCELoss

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cxr_lungs"
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smp:Unet/resnet18"
BATCH = 8


def case_list(work: Path, name: str, cases: list[str]) -> str:
    path = work / f"{name}.txt"
    path.write_text("\n".join(cases) + "\n", encoding="utf-8")
    return str(path)


def prepared(cases: list[str], card: ModelCard) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, S, S]`` and class indices ``[N, S, S]`` prepared as nakt prepares them."""
    xs, ys = [], []
    for name in cases:
        image = read_image(DATA / "images" / f"{name}.jpg")
        mask = encode_labels(read_mask(DATA / "masks" / f"{name}.png", like=image), card.label_values)
        xs.append(prepare_image(image.array, card))
        ys.append(resize(torch.from_numpy(mask)[None], tuple(xs[-1].shape[1:]), mode="nearest")[0])
    return torch.stack(xs), torch.stack(ys).long()


def plain_loop(card: ModelCard, data: dict, epochs: int, lr: float, seed: int, precision: str,
               device: str = "cpu") -> dict:
    """The hand-written loop on `device` (its tensors moved there before the clock starts; the random draws made
    on the CPU, as on a CPU run): returns training seconds, images trained and the last epoch's validation Dice.
    fp16 scales the loss, as nakt's engine does."""
    on = torch.device(device)
    x, y = (t.to(on) for t in data["train"])
    torch.manual_seed(seed)
    model = build_model(card).to(on)
    scaler = torch.amp.GradScaler(on.type) if precision == "fp16" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = (len(x) + BATCH - 1) // BATCH
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps + 1, pct_start=0.3)
    loss_fn = SoftDiceCELoss()
    generator = torch.Generator().manual_seed(seed)
    seconds, images, dice = 0.0, 0, None
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), BATCH):
            idx = order[i:i + BATCH]
            if len(idx) < 2:
                continue
            idx = idx.to(on)
            xb, yb = x[idx].clone(), one_hot(y[idx], card.classes)
            flip = (torch.rand(len(idx), generator=generator) < 0.5).to(on)
            xb[flip], yb[flip] = xb[flip].flip(-1), yb[flip].flip(-1)
            xb = xb * (0.9 + 0.2 * torch.rand(len(idx), 1, 1, 1, generator=generator)).to(on) \
                + (0.2 * torch.rand(len(idx), 1, 1, 1, generator=generator) - 0.1).to(on)
            with autocast(precision, on):
                loss = loss_fn(model(xb).float(), yb)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            schedule.step()
            images += len(idx)
        synchronize(device)  # the GPU's queued work is part of the epoch
        seconds += time.perf_counter() - started
    dice = validation_dice(model, *data["val"], card.classes, precision)
    return {"train_seconds": seconds, "images": images, "images_per_s": images / seconds, "val_dice": dice}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def validation_dice(model, x: torch.Tensor, y: torch.Tensor, classes: int, precision: str) -> float:
    """Mean Dice of `model` (on its own device) on prepared images `x` and class maps `y` (on the CPU)."""
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for i in range(0, len(x), BATCH):
        with autocast(precision, device):
            predicted = model(x[i:i + BATCH].to(device)).float().argmax(1).cpu()
        scores += [case_scores(p.numpy(), t.numpy(), classes, hd95=False)["dice"]
                   for p, t in zip(predicted, y[i:i + BATCH])]
    return float(np.mean(scores))


def nakt_run(work: Path, lists: dict, size: int, epochs: int, lr: float, seed: int, device: str = "cpu",
             **options) -> dict:
    """`nakt.train` on `device` (defaults unless `options`): training images/s (validation left out) and final
    Dice."""
    compiled = "_compile" if options.get("compile") else ""
    out = work / f"nakt_{device}_{seed}_{options.get('precision', 'default')}{compiled}"
    nakt.train(model=MODEL, images=str(DATA / "images"), masks=str(DATA / "masks"), cases=lists["train"],
               val_images=str(DATA / "images"), val_masks=str(DATA / "masks"), val_cases=lists["val"], size=[size],
               epochs=epochs, batch_size=BATCH, lr=lr, seed=seed, out=str(out), overwrite=True, progress=False,
               device=device, **options)
    metrics = rundir.read_metrics(out)
    history = metrics["history"]
    seconds = sum(h["seconds"] - h["val_seconds"] for h in history)
    images = sum(h["samples"] for h in history)
    first, later = history[0], history[1:]  # --compile compiles in the first epoch
    later_rate = (sum(h["samples"] for h in later) / sum(h["seconds"] - h["val_seconds"] for h in later)
                  if later else None)
    return {"train_seconds": seconds, "images": images, "images_per_s": images / seconds,
            "first_epoch_s": first["seconds"] - first["val_seconds"], "first_epoch_images": first["samples"],
            "later_images_per_s": later_rate, "val_dice": history[-1]["val_score"],
            "best_val_dice": metrics["best_val_score"], "precision": metrics["precision"]}


def compile_summary(per_seed: dict, plain_rate: float) -> dict:
    """``nakt train --compile`` against the plain fp32 loop (whole runs, and after the first epoch, which
    compiles) and against nakt's defaults after the first epoch; the break-even run length in images: the first
    epoch's compile overhead over the time saved per image. Medians over seeds."""
    median = lambda arm, key: statistics.median(r[arm][key] for r in per_seed.values())  # noqa: E731
    compiled, eager = median("nakt --compile", "later_images_per_s"), median("nakt defaults", "later_images_per_s")
    overhead = median("nakt --compile", "first_epoch_s") - median("nakt --compile", "first_epoch_images") / compiled
    saved = 1 / eager - 1 / compiled
    return {"speedup_whole_run": median("nakt --compile", "images_per_s") / plain_rate,
            "speedup_after_first_epoch": compiled / plain_rate, "vs_defaults_after_first_epoch": compiled / eager,
            "compile_overhead_s": overhead, "break_even_images": overhead / saved if saved > 0 else None}


def scale_folder(work: Path, cases: list[str], n: int) -> Path:
    """`n` training cases made of symlinks to the real ones (repeated under new names)."""
    folder = work / f"scale_{n}"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = cases[i % len(cases)]
        for sub, ext in (("images", ".jpg"), ("masks", ".png")):
            link = folder / sub / f"c{i:05d}{ext}"
            if not link.exists():
                link.symlink_to(DATA / sub / f"{name}{ext}")
    return folder


def _status_kb(path: str, key: str) -> float:
    """A ``key: N kB`` line of a /proc status or smaps_rollup file."""
    with open(path, encoding="ascii") as f:
        return next(float(line.split()[1]) for line in f if line.startswith(key + ":"))


def tree_pss_mb(pid: int) -> float:
    """PSS (MB) of process `pid` and all its descendants: shared pages (the workers' copy-on-write view of the
    parent) are split between the processes, so the sum is the memory they use together."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += _status_kb(f"/proc/{p}/smaps_rollup", "Pss") / 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):  # a process that ended meanwhile
            pass
    return total


# the memory runs: nakt's defaults (segmentation keeps prepared cases on disk, none in memory) and every prepared
# case held in memory (a cache larger than the set)
RSS_ARMS = {"defaults": None, "cache 4 GiB": 4.0}


def rss_child(folder: Path, size: int, cache_gb: float | None, out: Path) -> None:
    """One epoch of `nakt train` in this (fresh) process (`cache_gb` None: the default); prints its peak RSS
    (VmHWM, MB) and the sampled peak PSS of it and its DataLoader workers together."""
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], tree_pss_mb(os.getpid()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.time()
    nakt.train(model=MODEL, images=str(folder / "images"), masks=str(folder / "masks"), size=[size], epochs=1,
               batch_size=BATCH, val_fraction=0, out=str(out), overwrite=True, progress=False, device="cpu",
               **({} if cache_gb is None else {"cache_gb": cache_gb}))
    seconds = time.time() - started
    done.set()
    sampler.join()
    if os.path.exists("/proc/self/status"):
        rss = _status_kb("/proc/self/status", "VmHWM") / 1024
    else:  # no procfs: ru_maxrss (bytes on macOS), which after fork + exec may include the parent's RSS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    print(json.dumps({"rss_mb": rss, "tree_pss_mb": max(peak[0], tree_pss_mb(os.getpid())), "seconds": seconds}))


def peak_rss(work: Path, cases: list[str], sizes: list[int], size: int, arm: str) -> dict:
    out = {}
    for n in sizes:
        folder = scale_folder(work, cases, n)
        done = subprocess.run([sys.executable, __file__, "--rss-child", str(folder), str(size), str(RSS_ARMS[arm]),
                               str(work / f"rss_run_{n}")], capture_output=True, text=True, check=True)
        out[str(n)] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"RSS at {n} cases, {arm}: {out[str(n)]}", flush=True)
    first, last = out[str(sizes[0])], out[str(sizes[-1])]
    return {"arm": arm, "cache_gb": RSS_ARMS[arm], "by_cases": out, "growth": last["rss_mb"] / first["rss_mb"] - 1,
            "growth_tree_pss": last["tree_pss_mb"] / first["tree_pss_mb"] - 1}


def memory_rows(result: dict) -> list[tuple]:
    rows = []
    for rss in result["rss"]:
        sizes = list(rss["by_cases"])
        a, b = rss["by_cases"][sizes[0]], rss["by_cases"][sizes[-1]]
        rows.append((f"peak memory growth {sizes[0]} -> {sizes[-1]} cases ({rss['arm']}): process RSS "
                     f"{a['rss_mb']:.0f} -> {b['rss_mb']:.0f} MB; PSS with workers {a['tree_pss_mb']:.0f} -> "
                     f"{b['tree_pss_mb']:.0f} MB", f"{100 * rss['growth']:+.1f}% / "
                     f"{100 * rss['growth_tree_pss']:+.1f}%", "< 10%", result["targets"][f"memory_{rss['arm']}"]))
    return rows


def table(rows: list[tuple]) -> list[str]:
    return ["| measure | measured | target | met |", "| --- | --- | --- | --- |"] + [
        f"| {a} | {b} | {c} | {'' if d is None else 'yes' if d else '**no**'} |" for a, b, c, d in rows]


def speedup_target(auto: str) -> float:
    """Training's target against the plain fp32 loop: 1.8x where reduced precision is native, 1.3x in fp32
    (layout and the data pipeline alone)."""
    return 1.3 if auto == "fp32" else 1.8


def memory_markdown(result: dict) -> str:
    """The table of a ``--rss-only`` run."""
    return "\n".join([f"# Training memory ({result['machine']['device']})", "", f"Command: `{result['command']}`  ",
                      f"Model {MODEL}, batch {BATCH}, size {result['config']['size']}, one epoch per run in a fresh "
                      "process", "", *table(memory_rows(result))]) + "\n"


def markdown(result: dict) -> str:
    s, t, load = result["summary"], result["targets"], result["machine"]["load_average_1min"]
    rows = [("nakt train (defaults) vs plain fp32 loop, training images/s", f"{s['speedup']:.2f}x",
             f">= {speedup_target(result['precision_auto'])}x", t["speedup"]),
            ("final validation Dice, \\|nakt defaults - plain fp32\\| (mean over seeds; signed mean "
             f"{s['dice_gap']:+.4f})", f"{s['dice_gap_abs']:.4f}", "<= 0.005", t["dice_gap"]),
            (f"final validation Dice, nakt {result['precision_auto']} - nakt fp32 (mean over seeds)",
             f"{s['bf16_vs_fp32_dice_gap']:+.4f}", "", None),
            ("data-pipeline overhead (nakt vs plain loop at nakt's precision)", f"{100 * s['overhead']:.1f}%",
             "< 15%", t["overhead"])] + memory_rows(result)
    if "compile" in s:
        c, even = s["compile"], s["compile"]["break_even_images"]
        rows += [("nakt train --compile vs plain fp32 loop, whole run (compiling included)",
                  f"{c['speedup_whole_run']:.2f}x", "", None),
                 ("nakt train --compile vs plain fp32 loop, after the first epoch",
                  f"{c['speedup_after_first_epoch']:.2f}x", "", None),
                 ("nakt train --compile vs nakt defaults, after the first epoch",
                  f"{c['vs_defaults_after_first_epoch']:.2f}x", "", None),
                 ("--compile: compile overhead / break-even run length",
                  f"{c['compile_overhead_s']:.0f} s / " + ("never" if even is None else f"{even:,.0f} images"), "",
                  None)]
    lines = [f"# Training throughput ({result['mode']} mode, {result['machine']['device']})", "",
             f"Command: `{result['command']}`  ", f"Model {MODEL}, batch {BATCH}, size {result['config']['size']}, "
             f"{result['config']['epochs']} epochs, {result['config']['train_cases']} training cases, seeds "
             f"{result['config']['seeds']}; 1-min load average {load['start']:.1f} at the start, {load['end']:.1f} at "
             f"the end" + (" (above the core count: other work competed for the CPU, so the timings are unreliable)"
                           if max(load.values()) > result["machine"]["cpu_count"] else ""), "",
             *table(rows)]
    lines += ["", "| seed | run | images/s | final val Dice |", "| --- | --- | --- | --- |"]
    for seed, runs in result["per_seed"].items():
        lines += [f"| {seed} | {name} | {r['images_per_s']:.2f} | {r['val_dice']:.4f} |" for name, r in runs.items()]
    return "\n".join(lines) + "\n"


def memory_targets(rss: list[dict]) -> dict:
    return {f"memory_{r['arm']}": max(r["growth"], r["growth_tree_pss"]) < 0.10 for r in rss}


def machine(load_before: tuple, device: str = "cpu") -> dict:
    """The machine measured: CPU model, its ISA flags and effective level (`nakt.machine`), threads, the GPU."""
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {**this_machine().to_json(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_bf16": cpu_has_bf16(), "python": platform.python_version(), "nakt": nakt.__version__,
            "isa_caps": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                                                    "MKL_ENABLE_INSTRUCTIONS") if k in os.environ},
            "device": f"GPU {gpu}" if gpu else f"CPU ({os.cpu_count()} cores)", "gpu": gpu,
            "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]}}


def result_name(device: str) -> str:
    """One results file per machine kind (``training_throughput_avx2``, ``..._avx512_bf16``, ``..._cuda``), so a
    run on one kind never overwrites another's; ``training_throughput.json`` holds the first AVX512-BF16 run."""
    return f"training_throughput_{device}" if device != "cpu" else f"training_throughput_{this_machine().isa}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 64 px, 2 epochs, 8 cases")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-cases", type=int, help="at most this many teacher_train cases")
    parser.add_argument("--scale-sizes", type=int, nargs=2, help="training cases for the RSS runs (1x, 10x)")
    parser.add_argument("--rss-only", action="store_true",
                        help="only the peak-RSS runs, into training_throughput_memory.{json,md}")
    parser.add_argument("--rss-arms", nargs="+", choices=list(RSS_ARMS), default=list(RSS_ARMS),
                        help="which memory runs (default: all)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "training_throughput"))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--no-rss", action="store_true", help="leave out the peak-RSS runs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: nakt.train and the plain loop on the GPU, written as training_throughput_cuda."
                        "{json,md}; the memory runs (CPU process memory) are left out")
    parser.add_argument("--compile", action="store_true",
                        help="also nakt train --compile (its first epoch compiles): speed with and without that "
                        "epoch, and the run length from which it pays")
    parser.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and args.rss_only:
        parser.error("--rss-only measures CPU training memory: leave out --device cuda")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("training_throughput: --device cuda: no CUDA GPU here (torch.cuda.is_available() is false)")
    if args.rss_child:
        folder, size, cache_gb, out = args.rss_child
        rss_child(Path(folder), int(size), None if cache_gb == "None" else float(cache_gb), Path(out))
        return {}
    if not DATA.is_dir():
        sys.exit(f"training_throughput: {DATA}: dataset not found")
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    size, epochs = args.size or (64 if args.quick else 256), args.epochs or (2 if args.quick else 10)
    scale_sizes = args.scale_sizes or ([20, 200] if args.quick else [200, 2000])
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    splits = json.loads((DATA / "splits.json").read_text(encoding="utf-8"))
    train_cases = splits["teacher_train"][:args.train_cases or (8 if args.quick else None)]
    lists = {"train": case_list(work, "train", train_cases), "val": case_list(work, "val", splits["teacher_val"])}
    card = ModelCard(MODEL, 1, 2, label_values=[0, 255], size=[size])
    precision = resolve_precision("auto", torch.device(device))
    command = " ".join(["python", "benchmarks/training_throughput.py", *(sys.argv[1:] if argv is None else argv)])
    started, load_before = time.time(), os.getloadavg()
    config = {"size": size, "epochs": epochs, "seeds": seeds, "train_cases": len(train_cases),
              "val_cases": len(splits["teacher_val"]), "lr": args.lr, "scale_sizes": scale_sizes}
    if args.rss_only:
        rss = [peak_rss(work, train_cases, scale_sizes, size, arm) for arm in args.rss_arms]
        result = {"command": command, "config": config, "rss": rss, "targets": memory_targets(rss),
                  "machine": machine(load_before), "total_wall_s": time.time() - started}
        out.mkdir(parents=True, exist_ok=True)
        (out / "training_throughput_memory.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        (out / "training_throughput_memory.md").write_text(memory_markdown(result), encoding="utf-8")
        print(memory_markdown(result))
        return result
    data = {"train": prepared(train_cases, card), "val": prepared(splits["teacher_val"], card)}
    per_seed = {}
    if device == "cuda":  # CUDA's start-up and cuDNN's first algorithm searches, outside every timed arm
        plain_loop(card, data, 1, args.lr, 0, precision, device)
    for seed in seeds:  # interleaved per seed, so that the machine's slow moments touch every arm
        runs = {"nakt defaults": nakt_run(work, lists, size, epochs, args.lr, seed, device),
                "plain fp32": plain_loop(card, data, epochs, args.lr, seed, "fp32", device),
                "nakt fp32": nakt_run(work, lists, size, epochs, args.lr, seed, device, precision="fp32")}
        runs[f"plain {precision} (compute only)"] = plain_loop(card, data, epochs, args.lr, seed, precision, device)
        if args.compile:
            runs["nakt --compile"] = nakt_run(work, lists, size, epochs, args.lr, seed, device, compile=True)
        per_seed[str(seed)] = runs
        print(f"[seed {seed}] " + ", ".join(f"{k}: {v['images_per_s']:.2f} img/s, Dice {v['val_dice']:.4f}"
                                           for k, v in runs.items()), flush=True)
    rate = {arm: statistics.median(r[arm]["images_per_s"] for r in per_seed.values())
            for arm in ("nakt defaults", "plain fp32", "nakt fp32")}
    compute = f"plain {precision} (compute only)"
    summary = {"speedup": rate["nakt defaults"] / rate["plain fp32"], "median_images_per_s": rate,
               "dice_gap": statistics.fmean(r["nakt defaults"]["val_dice"] - r["plain fp32"]["val_dice"]
                                            for r in per_seed.values()),
               "dice_gap_abs": statistics.fmean(abs(r["nakt defaults"]["val_dice"] - r["plain fp32"]["val_dice"])
                                                for r in per_seed.values()),
               "bf16_vs_fp32_dice_gap": statistics.fmean(r["nakt defaults"]["val_dice"] - r["nakt fp32"]["val_dice"]
                                                         for r in per_seed.values()),
               "overhead": statistics.median(r[compute]["images_per_s"] / r["nakt defaults"]["images_per_s"] - 1
                                             for r in per_seed.values())}
    if args.compile:
        summary["compile"] = compile_summary(per_seed, rate["plain fp32"])
    rss = [] if args.no_rss or device == "cuda" else [peak_rss(work, train_cases, scale_sizes, size, arm)
                                                      for arm in args.rss_arms]
    targets = {"speedup": summary["speedup"] >= speedup_target(precision), "dice_gap": summary["dice_gap_abs"] <= 0.005,
               "overhead": summary["overhead"] < 0.15, **memory_targets(rss)}
    result = {"mode": "quick" if args.quick else "full", "command": command, "precision_auto": precision,
              "config": config, "machine": machine(load_before, device), "device": device,
              "per_seed": per_seed, "summary": summary, "targets": targets, "rss": rss,
              "total_wall_s": time.time() - started}
    out.mkdir(parents=True, exist_ok=True)
    name = result_name(device)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
