"""When does ``--compile`` pay for label/predict/evaluate on this machine?

For each teacher network (untrained smp nets, 1 channel, 2 classes, at `--size` px), one batch of `--batch` images
through nakt's inference core (`nakt.inference.net_probs`: inference mode, the machine's layout and `auto`
precision) eager and after `nakt.inference.compile_for_inference` (Inductor, frozen weights). Records the first
compiled batch (the compile time), the median seconds per batch of each (eager and compiled batches interleaved,
so load from other work hits both alike), the labels' agreement (argmax) between the two, and the break-even
number of cases: compile overhead / seconds saved per case. A run with fewer cases than that is slower compiled.

Writes ``benchmarks/results/compile_<isa>.json`` (one file per machine kind, `nakt.machine`).

    python benchmarks/compile_bench.py [--size 256] [--batch 8] [--repeats 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from nakt.inference import compile_for_inference, net_probs, resolve_layout, resolve_precision
from nakt.machine import this_machine
from nakt.models import ModelCard, build_model

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = ("smp:Unet/resnet18", "smp:DeepLabV3Plus/mobilenet_v2", "smp:FPN/resnet34")


def time_batch(model, x: torch.Tensor, precision: str, channels_last: bool) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    probs = net_probs(model, x, precision, channels_last=channels_last)
    return time.perf_counter() - start, probs


def measure(spec: str, x: torch.Tensor, precision: str, channels_last: bool, repeats: int) -> dict:
    eager = build_model(ModelCard(spec=spec, in_channels=1, classes=2)).eval()
    eager.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    compiled = copy.deepcopy(eager)
    compile_for_inference(compiled)
    time_batch(eager, x, precision, channels_last)  # warm-up: oneDNN primitives are made on the first batch
    first, compiled_probs = time_batch(compiled, x, precision, channels_last)
    seconds = {"eager": [], "compiled": []}
    for r in range(repeats):
        order = (("eager", eager), ("compiled", compiled))
        for name, model in order if r % 2 == 0 else order[::-1]:
            seconds[name].append(time_batch(model, x, precision, channels_last)[0])
    median = {name: statistics.median(values) for name, values in seconds.items()}
    eager_probs = net_probs(eager, x, precision, channels_last=channels_last)
    saved_per_case = (median["eager"] - median["compiled"]) / len(x)
    overhead = first - median["compiled"]
    return {"first_compiled_batch_s": first, "seconds_per_batch": median, "all_seconds": seconds,
            "speedup": median["eager"] / median["compiled"],
            "label_agreement": float((eager_probs.argmax(1) == compiled_probs.argmax(1)).float().mean()),
            "max_abs_prob_diff": float((eager_probs - compiled_probs).abs().max()),
            "compile_overhead_s": overhead, "saved_per_case_s": saved_per_case,
            "break_even_cases": overhead / saved_per_case if saved_per_case > 0 else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", action="append", help=f"specs to time (default: {', '.join(TEACHERS)})")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device("cpu")
    precision, channels_last = resolve_precision("auto", device), resolve_layout("auto", device, 2)
    x = torch.randn(args.batch, 1, args.size, args.size, generator=torch.Generator().manual_seed(1))
    machine = this_machine()
    result = {"machine": machine.to_json(), "size": args.size, "batch": args.batch, "repeats": args.repeats,
              "precision": precision, "channels_last": channels_last,
              "command": "python benchmarks/compile_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "teachers": {}}
    for spec in args.teacher or TEACHERS:
        result["teachers"][spec] = m = measure(spec, x, precision, channels_last, args.repeats)
        print(f"{spec}: compile (first batch) {m['first_compiled_batch_s']:.1f} s, eager "
              f"{m['seconds_per_batch']['eager']:.3f} s/batch, compiled {m['seconds_per_batch']['compiled']:.3f} "
              f"s/batch ({m['speedup']:.2f}x), agreement {m['label_agreement']:.5f}, break-even "
              f"{m['break_even_cases'] and round(m['break_even_cases'])} cases", flush=True)
    # all teachers compiled, as `nakt label --compile` does: their overheads against their savings together
    runs = result["teachers"].values()
    overhead, saved = (sum(m[k] for m in runs) for k in ("compile_overhead_s", "saved_per_case_s"))
    result["break_even_cases_all_teachers"] = overhead / saved if saved > 0 else None
    print(f"all teachers: break-even {result['break_even_cases_all_teachers']} cases")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"compile_{machine.isa}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
