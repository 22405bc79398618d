"""Does folding BatchNorm into convolutions (`nakt.fold.fold_batchnorm`) make inference faster here?

Times one network batch through nakt's inference core (`nakt.inference.net_probs`: inference mode, channels-last,
autocast) for an untrained smp Unet/resnet18 (30 BatchNorms, all folded) at 256 px, batch 8, in fp32 and, when
this CPU computes bfloat16 natively (`nakt.inference.cpu_has_bf16`), under bf16 autocast. The folded and unfolded
copies alternate batch by batch (interleaved repeats, the order swapped every round), so that load from other
work on the machine hits both alike; medians are reported, with the ratio folded / unfolded of the per-batch
seconds (below 1: folding is faster) and the largest probability difference between the two.

Writes ``benchmarks/results/fold_bench.json`` with the CPU (``model name``, the flags avx2 avx512f avx512_bf16
amx_bf16, ``torch.backends.cpu.get_cpu_capability()``) and torch's thread count.

    python benchmarks/fold_bench.py [--size 256] [--batch 8] [--repeats 8] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from nakt.fold import fold_batchnorm
from nakt.inference import cpu_has_bf16, net_probs
from nakt.models import ModelCard, build_model

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_info() -> dict:
    """The CPU's model name and the vector flags that decide which kernels oneDNN picks."""
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name") and name is None:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model_name": name or platform.processor(), "flags": {f: f in flags for f in FLAGS},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}


def time_batch(model, x: torch.Tensor, precision: str) -> float:
    start = time.perf_counter()
    net_probs(model, x, precision)
    return time.perf_counter() - start


def measure(plain, folded, x: torch.Tensor, precision: str, repeats: int) -> dict:
    """Median seconds per batch of each model, timed alternately (after one warm-up batch each)."""
    for model in (plain, folded):
        time_batch(model, x, precision)
    seconds = {"unfolded": [], "folded": []}
    for r in range(repeats):
        order = (("unfolded", plain), ("folded", folded))
        for name, model in order if r % 2 == 0 else order[::-1]:
            seconds[name].append(time_batch(model, x, precision))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    diff = float((net_probs(plain, x, precision) - net_probs(folded, x, precision)).abs().max())
    return {"seconds_per_batch": median, "images_per_s": {k: x.shape[0] / v for k, v in median.items()},
            "ratio_folded_over_unfolded": median["folded"] / median["unfolded"],
            "all_seconds": seconds, "max_abs_prob_diff": diff}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="smp:Unet/resnet18")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    plain = build_model(ModelCard(spec=args.spec, in_channels=1, classes=2)).eval()
    folded = copy.deepcopy(plain)
    count = fold_batchnorm(folded)
    for model in (plain, folded):
        model.to(memory_format=torch.channels_last)  # as nakt's batched inference holds 2D networks
    x = torch.randn(args.batch, 1, args.size, args.size, generator=torch.Generator().manual_seed(1))
    precisions = ["fp32"] + (["bf16"] if cpu_has_bf16() else [])
    result = {"spec": args.spec, "size": args.size, "batch": args.batch, "repeats": args.repeats,
              "batchnorm_folded": count, "cpu": cpu_info(),
              "precisions": {p: measure(plain, folded, x, p, args.repeats) for p in precisions}}
    result["keep_folding"] = all(m["ratio_folded_over_unfolded"] <= 1.0 for m in result["precisions"].values())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fold_bench.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for p, m in result["precisions"].items():
        print(f"{p}: unfolded {m['images_per_s']['unfolded']:.2f} img/s, folded {m['images_per_s']['folded']:.2f} "
              f"img/s, ratio {m['ratio_folded_over_unfolded']:.3f}, max |dp| {m['max_abs_prob_diff']:.1e}")
    return result


if __name__ == "__main__":
    main()
