"""Labeling throughput: how close does ``nakt label`` run to the hardware's limit, and does it stay linear?

One run on the same inputs (../shared/data/cxr_lungs, teachers at 256 px, K = 3 teachers of three families:
smp U-Net/ResNet-18, smp FPN/ResNet-34, MONAI SegResNet, trained here on the teacher_train split):

- images/s of ``nakt.label`` (defaults, and ``--precision fp32``) against a naive loop written below: per image,
  per teacher, decode the image again and run the network on a batch of one in fp32 (what tutorials do), fuse
  by the mean and write the same mask and probabilities; repeated and interleaved, medians reported;
- the achieved FLOP rate (network FLOPs from ``torch.utils.flop_counter`` over the whole labeling wall time) as a
  fraction of the fp32 matmul rate and of the rate of the precision ``auto`` picks, measured in the same run;
- pixel agreement of the ``auto`` and fp32 label sets (and of nakt's fp32 labels with the naive loop's);
- marginal time per case (over the second half of the cases, from the records' write times) and peak RSS of a
  fresh process at 100, 1,000 and 10,000 cases (one image repeated, a small teacher);
- ``torchrun --nproc-per-node 2`` against one process on the same work;
- a ``torch.profiler`` summary of one labeling run (where the time goes).

Writes ``benchmarks/results/throughput_<kind>.json`` and ``.md``, one pair per machine kind (`result_name`:
the CPU's ISA level from ``nakt.machine``, or ``cuda``); ``throughput.json`` holds the first AVX512-BF16 run.
A CPU without AVX-512 can be stood in for on one that has it by capping PyTorch's kernels:
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` (recorded as ``isa_caps``).

    python benchmarks/throughput.py [--quick] [--work runs/throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from torch.utils.flop_counter import FlopCounterMode

import nakt
from nakt.inference import resolve_layout, resolve_precision, to_image_grid
from nakt.io import labelset
from nakt.io.dataset import discover_cases
from nakt.io.images import read_image, read_mask, write_label
from nakt.io.rundir import is_complete
from nakt.machine import this_machine
from nakt.preprocess import decode_labels, prepare_image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cxr_lungs"
RESULTS = ROOT / "benchmarks" / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEACHERS = {"unet": "smp:Unet/resnet18", "fpn": "smp:FPN/resnet34", "segresnet": "monai:SegResNet"}
LABELLED_SPLITS = ("transferal", "finetune", "test")  # images the teachers did not train on


def train_teachers(work: Path, epochs: int, size: int = 256, max_cases: int | None = None) -> list[Path]:
    """The three teachers, trained on teacher_train (its first `max_cases`) at `size` px, validated on
    teacher_val (kept in `work` and reused when complete)."""
    splits = json.loads((DATA / "splits.json").read_text(encoding="utf-8"))
    lists = {}
    for split in ("teacher_train", "teacher_val"):
        lists[split] = work / f"{split}.json"
        lists[split].write_text(json.dumps(splits[split][:max_cases]), encoding="utf-8")
    runs = []
    for name, spec in TEACHERS.items():
        run = work / "teachers" / name
        if not (run / "config.json").is_file() or not is_complete(run):
            print(f"training {spec} ...", flush=True)
            nakt.train(model=spec, images=str(DATA / "images"), masks=str(DATA / "masks"),
                       cases=str(lists["teacher_train"]), val_images=str(DATA / "images"),
                       val_masks=str(DATA / "masks"), val_cases=str(lists["teacher_val"]), size=[size],
                       epochs=epochs, batch_size=8, lr=1e-3, seed=0, out=str(run), overwrite=True, progress=False)
        runs.append(run)
    return runs


def case_list(work: Path, limit: int | None) -> Path:
    splits = json.loads((DATA / "splits.json").read_text(encoding="utf-8"))
    names = sorted(n for split in LABELLED_SPLITS for n in splits[split])[:limit]
    path = work / "cases.json"
    path.write_text(json.dumps(names), encoding="utf-8")
    return path


def naive_label(runs: list[Path], cases: Path, out: Path, device: str = "cpu") -> float:
    """The baseline a user writes by hand: per image, per teacher, decode again and run the network on a batch
    of one, NCHW, fp32, under ``torch.no_grad`` (nakt's preprocessing and its mapping back to the image grid, so
    that the labels are comparable); fuse by the mean and write the same mask and probabilities. Returns seconds.
    """
    started = time.perf_counter()
    models = [nakt.load(str(run)).to(device).eval() for run in runs]
    values = list(models[0].card.label_values)
    for case in discover_cases(DATA / "images", cases=cases):
        teacher_probs = []
        for model in models:
            image = read_image(case.images)
            with torch.no_grad():
                probs = model.predict_proba(prepare_image(image.array, model.card, case.images[0])[None].to(device))
            teacher_probs.append(to_image_grid(probs[0].float().cpu(), image.spatial_shape))
        fused = np.mean(teacher_probs, axis=0)
        write_label(decode_labels(fused.argmax(0), values), image, out / "masks" / case.name)
        labelset.write_probs(out, case.name, fused)  # the same file writer as nakt's, so only the loop differs
    return time.perf_counter() - started


def nakt_label(runs: list[Path], cases: Path, out: Path, device: str = "cpu", **options) -> float:
    started = time.perf_counter()
    nakt.label(teacher=[str(r) for r in runs], images=str(DATA / "images"), cases=str(cases), out=str(out),
               fusion="mean", device=device, progress=False, overwrite=True, **options)
    return time.perf_counter() - started


def matmul_gflops(dtype: torch.dtype, device: str = "cpu", n: int = 2048, repeats: int = 8) -> float:
    if device != "cpu":
        n, repeats = 8192, 50
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def _synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def network_flops(runs: list[Path], cases: Path) -> float:
    """FLOPs of the K networks for one image (its prepared input, batch of one)."""
    case = discover_cases(DATA / "images", cases=cases)[0]
    image = read_image(case.images)
    total = 0
    for run in runs:
        model = nakt.load(str(run)).eval()
        x = prepare_image(image.array, model.card, case.images[0])[None]
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(x)
        total += counter.get_total_flops()
    return float(total)


def network_seconds(runs: list[Path], cases: Path, precision: str, device: str = "cpu", batch_size: int = 8) -> float:
    """Seconds the K networks alone take over the cases (inputs prepared beforehand, nakt's batches and
    precision, no decoding, fusion or writing): the ceiling the whole pipeline can approach."""
    from nakt.batched import LoadedCase, block_probs, blocks, load_blocks
    from nakt.teachers import load_teacher

    teachers = [load_teacher(str(run), device) for run in runs]
    listed = discover_cases(DATA / "images", cases=cases)
    loaded: list[list[LoadedCase]] = list(load_blocks(listed, blocks(len(listed), batch_size), "RAS", teachers))
    started = time.perf_counter()
    for teacher in teachers:
        for block in loaded:
            block_probs(teacher, block, precision)  # returns CPU arrays: synchronised
    return time.perf_counter() - started


def agreement(a: Path, b: Path) -> float:
    """Fraction of pixels with the same label in the masks of two label sets."""
    same = total = 0
    for mask in sorted((a / "masks").iterdir()):
        x, y = read_mask(mask), read_mask(b / "masks" / mask.name)
        same += int((x == y).sum())
        total += x.size
    return same / total


def profile_summary(runs: list[Path], cases: Path, out: Path, device: str = "cpu", rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    with profile(activities=activities) as prof:
        nakt_label(runs, cases, out, device)
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=rows)


# the process's own peak RSS (VmHWM): ru_maxrss would start from the parent's RSS after fork + exec
SCALE_SCRIPT = """
import json, sys, time
import nakt
started = time.perf_counter()
nakt.label(teacher=[sys.argv[1]], images=sys.argv[2], out=sys.argv[3], device="cpu", progress=False)
with open("/proc/self/status", encoding="ascii") as status:
    peak = next(float(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": peak / 1024}))
"""


def scale_run(teacher: Path, work: Path, n_cases: int) -> dict:
    """Label `n_cases` copies of one small image in a fresh process: marginal time per case over the second
    half of the cases (from the records' write times) and the process's peak RSS."""
    folder = work / f"scale_{n_cases}"
    images, out = folder / "images", folder / "labels"
    images.mkdir(parents=True, exist_ok=True)
    source = work / "scale_source.png"
    for i in range(n_cases):
        link = images / f"case_{i:05d}.png"
        if not link.exists():
            link.symlink_to(source)
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    result = subprocess.run([sys.executable, "-c", SCALE_SCRIPT, str(teacher), str(images), str(out)],
                            check=True, capture_output=True, text=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    times = sorted(p.stat().st_mtime_ns for p in (out / "records").iterdir())
    half = len(times) // 2
    marginal = (times[-1] - times[half]) / 1e9 / (len(times) - 1 - half)
    return {"cases": n_cases, "seconds": measured["seconds"], "marginal_ms_per_case": 1e3 * marginal,
            "peak_rss_mb": measured["peak_rss_mb"]}


def scale_teacher(work: Path) -> Path:
    """A small teacher (MONAI UNet at 64 px, one short epoch) and a 128-px copy of one X-ray to repeat."""
    first = sorted((DATA / "images").iterdir())[0]
    PILImage.open(first).convert("L").resize((128, 128)).save(work / "scale_source.png")
    run = work / "scale_teacher"
    if not (run / "config.json").is_file() or not is_complete(run):
        nakt.train(model="monai:UNet", images=str(DATA / "images"), masks=str(DATA / "masks"),
                   cases=f"{DATA}/splits.json:finetune", size=[64], epochs=1, batch_size=4, val_fraction=0,
                   out=str(run), overwrite=True, progress=False)
    return run


def torchrun_run(runs: list[Path], cases: Path, out: Path, processes: int) -> float:
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "nakt", "label", *[a for r in runs for a in ("--teacher", str(r))],
               "--images", str(DATA / "images"), "--cases", str(cases), "--out", str(out), "--device", "cpu",
               "--no-progress"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def machine(device: str) -> dict:
    """The machine measured: CPU model, its ISA flags and effective level (`nakt.machine`), threads, the GPU."""
    return {**this_machine().to_json(), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "nakt": nakt.__version__,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "isa_caps": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                                                    "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}}


def result_name(device: str) -> str:
    """One results file per machine kind (``throughput_avx2``, ``throughput_avx512_bf16``, ``throughput_cuda``),
    so a run on one kind never overwrites another kind's numbers."""
    return f"throughput_{device}" if device != "cpu" else f"throughput_{this_machine().isa}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "throughput"))
    parser.add_argument("--out", default=str(RESULTS), help="folder for throughput_<kind>.json and .md")
    parser.add_argument("--quick", action="store_true", help="few images, short training, small scale sweep")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the timed runs")
    parser.add_argument("--epochs", type=int, help="teacher training epochs (default 15, quick 2)")
    parser.add_argument("--size", type=int, default=256, help="teachers' input size")
    parser.add_argument("--images", type=int, help="label only the first N images (default all; quick 24)")
    parser.add_argument("--train-cases", type=int, help="train the teachers on the first N training cases only")
    parser.add_argument("--scale-sizes", type=int, nargs="+", help="case counts of the scale sweep "
                        "(default 100 1000 10000; quick 100 300 1000)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the timed runs on the GPU, written as throughput_cuda.json/.md (the torchrun "
                        "and scale parts are CPU measures and are skipped)")
    parser.add_argument("--no-torchrun", action="store_true",
                        help="leave out the torchrun 1 vs 2 processes measure (tests/test_label_scale covers its "
                        "correctness)")
    args = parser.parse_args(argv)
    device = args.device
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    runs = train_teachers(work, args.epochs or (2 if quick else 15), args.size, args.train_cases)
    cases = case_list(work, args.images or (24 if quick else None))
    n_images = len(json.loads(cases.read_text(encoding="utf-8")))
    auto = resolve_precision("auto", torch.device(device))

    timings: dict[str, list[float]] = {"naive": [], "nakt_fp32": [], "nakt_auto": [], "networks_only": []}
    # the fp32 rate, and the auto precision's: a bf16 matmul where bf16 is not native runs reference kernels
    rates: dict[str, list[float]] = {p: [] for p in dict.fromkeys(("fp32", auto))}
    for rep in range(args.repeats):  # interleaved, so drifts in machine speed hit every variant
        print(f"repeat {rep + 1}: naive, nakt fp32, nakt {auto}, networks alone", flush=True)
        for p in rates:
            rates[p].append(matmul_gflops(DTYPES[p], device))
        timings["naive"].append(naive_label(runs, cases, work / "naive", device))
        timings["nakt_fp32"].append(nakt_label(runs, cases, work / "nakt_fp32", device, precision="fp32"))
        timings["nakt_auto"].append(nakt_label(runs, cases, work / "nakt_auto", device))
        timings["networks_only"].append(network_seconds(runs, cases, auto, device))
    seconds = {k: statistics.median(v) for k, v in timings.items()}
    images_per_s = {k: n_images / s for k, s in seconds.items()}
    matmul = {k: statistics.median(v) for k, v in rates.items()}
    flops = network_flops(runs, cases)
    achieved = flops * n_images / seconds["nakt_auto"] / 1e9
    achieved_networks = flops * n_images / seconds["networks_only"] / 1e9

    print("profiling ...", flush=True)
    profile_cases = work / "profile_cases.json"
    profile_cases.write_text(json.dumps(json.loads(cases.read_text(encoding="utf-8"))[:48]), encoding="utf-8")
    profile = profile_summary(runs, profile_cases, work / "profiled", device)
    torchrun, scale = None, []
    if device == "cpu" and not args.no_torchrun:
        print("torchrun 1 vs 2 processes ...", flush=True)
        torchrun = {f"{p}_process": n_images / torchrun_run(runs, cases, work / f"torchrun_{p}", p) for p in (1, 2)}
    if device == "cpu":
        print("scale sweep ...", flush=True)
        teacher = scale_teacher(work)
        sizes = args.scale_sizes or ((100, 300, 1000) if quick else (100, 1000, 10000))
        scale = [scale_run(teacher, work, n) for n in sizes]

    results = {
        "machine": machine(device), "device": device, "quick": quick, "images": n_images, "teachers": TEACHERS,
        "size": args.size,
        "precision_auto": auto, "channels_last_auto": resolve_layout("auto", torch.device(device), 2),
        "seconds": timings, "images_per_s": images_per_s,
        "speedup_vs_naive": images_per_s["nakt_auto"] / images_per_s["naive"],
        "speedup_fp32_vs_naive": images_per_s["nakt_fp32"] / images_per_s["naive"],
        "matmul_gflops": rates, "network_gflop_per_image": flops / 1e9, "achieved_gflops": achieved,
        "fraction_of_fp32_matmul": achieved / matmul["fp32"], "fraction_of_auto_matmul": achieved / matmul[auto],
        "achieved_gflops_networks_only": achieved_networks,
        "networks_only_fraction_of_auto_matmul": achieved_networks / matmul[auto],
        "agreement_auto_fp32": agreement(work / "nakt_auto", work / "nakt_fp32"),
        "agreement_fp32_naive": agreement(work / "nakt_fp32", work / "naive"),
        "torchrun_images_per_s": torchrun, "scale": scale,
        "scale_ratio_marginal": _ratio(scale, "marginal_ms_per_case"), "scale_ratio_rss": _ratio(scale, "peak_rss_mb"),
        "profile": profile,
        "command": " ".join(["python benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    results["targets"] = {
        f"speedup_vs_naive >= {speedup_target(auto)}": results["speedup_vs_naive"] >= speedup_target(auto),
        "fraction_of_auto_matmul >= 0.70": results["fraction_of_auto_matmul"] >= 0.70,
        "agreement_auto_fp32 >= 0.999": results["agreement_auto_fp32"] >= 0.999,
    }
    if scale:
        results["targets"]["marginal time at the largest size within 10%"] = results["scale_ratio_marginal"] <= 1.10
        results["targets"]["peak RSS at the largest size within 10%"] = results["scale_ratio_rss"] <= 1.10
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = result_name(device)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text(table(results), encoding="utf-8")
    print(table(results))
    return results


def speedup_target(auto: str) -> float:
    """Labeling's target against the naive loop: 2.5x where reduced precision is native (it does the most), 1.5x
    in fp32 (batching and layout alone)."""
    return 1.5 if auto == "fp32" else 2.5


def table(r: dict) -> str:
    ips, auto = r["images_per_s"], r["precision_auto"]
    target = speedup_target(auto)
    where = r["machine"]["gpu"] or f"{r['machine']['cpu_count']} CPU cores"
    lines = [f"Labeling throughput, {r['images']} cxr_lungs images, K = 3 teachers at {r['size']} px "
             f"({', '.join(r['teachers'].values())}); {where}; `{r['command']}`", "",
             "| measure | value | target | met |", "| --- | --- | --- | --- |",
             f"| naive loop (per teacher, batch 1, fp32) | {ips['naive']:.2f} images/s | | |",
             f"| nakt label, --precision fp32 | {ips['nakt_fp32']:.2f} images/s "
             f"({r['speedup_fp32_vs_naive']:.2f}x naive) | | |",
             f"| nakt label, defaults (precision auto = {auto}, channels-last {r['channels_last_auto']}) | "
             f"{ips['nakt_auto']:.2f} images/s ({r['speedup_vs_naive']:.2f}x naive) | >= {target}x | "
             f"{_yes(r['targets'][f'speedup_vs_naive >= {target}'])} |",
             f"| achieved network FLOP rate (whole labeling wall time) | {r['achieved_gflops']:.0f} GFLOP/s = "
             f"{100 * r['fraction_of_auto_matmul']:.0f}% of {auto} matmul "
             f"({statistics.median(r['matmul_gflops'][auto]):.0f}), "
             f"{100 * r['fraction_of_fp32_matmul']:.0f}% of fp32 matmul "
             f"({statistics.median(r['matmul_gflops']['fp32']):.0f}) | >= 70% of {auto} | "
             f"{_yes(r['targets']['fraction_of_auto_matmul >= 0.70'])} |",
             f"| the same, networks alone (inputs prepared beforehand, {ips['networks_only']:.2f} images/s) | "
             f"{r['achieved_gflops_networks_only']:.0f} GFLOP/s = "
             f"{100 * r['networks_only_fraction_of_auto_matmul']:.0f}% of {auto} matmul | | |",
             f"| pixel agreement, {auto} vs fp32 labels | {100 * r['agreement_auto_fp32']:.3f}% "
             f"| >= 99.9% | {_yes(r['targets']['agreement_auto_fp32 >= 0.999'])} |",
             f"| pixel agreement, nakt fp32 vs naive loop | {100 * r['agreement_fp32_naive']:.3f}% | | |",
             ]
    if r["torchrun_images_per_s"]:
        lines.append(f"| torchrun, 1 process / 2 processes | {r['torchrun_images_per_s']['1_process']:.2f} / "
                     f"{r['torchrun_images_per_s']['2_process']:.2f} images/s | | |")
    for s in r["scale"]:
        lines.append(f"| {s['cases']:,} cases (small teacher) | {s['marginal_ms_per_case']:.2f} ms/case marginal, "
                     f"peak RSS {s['peak_rss_mb']:.0f} MB | | |")
    if r["scale"]:
        lines.append(f"| largest vs next size | marginal x{r['scale_ratio_marginal']:.2f}, RSS "
                     f"x{r['scale_ratio_rss']:.2f} | within 10% | "
                     f"{_yes(r['targets']['marginal time at the largest size within 10%'])} / "
                     f"{_yes(r['targets']['peak RSS at the largest size within 10%'])} |")
    if not all(r["targets"].values()):
        lines += ["", "Where the time goes (torch.profiler over `nakt label` of 48 images with its defaults; the named "
                  "`nakt.label:` rows are its stages, the networks on the main thread and fusion and writing on the "
                  "background thread):", "", "```", r["profile"], "```"]
    return "\n".join(lines) + "\n"


def _ratio(scale: list[dict], key: str) -> float | None:
    """The largest size's value over the next largest's."""
    return scale[-1][key] / scale[-2][key] if len(scale) >= 2 else None


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


if __name__ == "__main__":
    main()
