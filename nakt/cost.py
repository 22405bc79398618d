"""What a model costs per case on this machine, beside what it scores: parameters, forward FLOPs
(`torch.utils.flop_counter`) and measured latency, for one teacher, for the teachers' ensemble as ``nakt label``
runs it, and for a run exported to ONNX Runtime.

Latency is the median over `repeats` runs (after two warm-up runs) of the whole path of one case as nakt runs it:
the image decoded and prepared for each preprocessing, each teacher's probabilities mapped back to the image grid in
a batch of one, and, for several teachers, fused. FLOPs count the forward passes of that path (every sliding
window and flip); teachers that run outside PyTorch (ONNX Runtime) or read files (``masks:``) have none to count.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nakt.batched import block_probs, load_blocks
from nakt.export import ExportOptions, export
from nakt.fusion import fuse
from nakt.inference import resolve_precision
from nakt.io.dataset import Case
from nakt.machine import this_machine
from nakt.models.onnx import OnnxNet
from nakt.teachers import Teacher, load_teacher, reading_orientation

__all__ = ["Cost", "case_cost", "onnx_latency", "parameter_count"]


@dataclass
class Cost:
    """One case's cost for a model or an ensemble: `parameters` (None where unknown), `flops` (forward FLOPs,
    None where not counted), `latency_s` (median seconds), the `precision` it ran in, and `onnx_latency_s` (the
    same through ONNX Runtime, for a run exported with ``nakt export``; None when not measured)."""

    parameters: int | None
    flops: float | None
    latency_s: float
    precision: str
    onnx_latency_s: float | None = None

    def to_json(self) -> dict:
        return {**asdict(self), "gflops": None if self.flops is None else round(self.flops / 1e9, 4),
                "latency_ms": round(1000 * self.latency_s, 3),
                "onnx_latency_ms": None if self.onnx_latency_s is None else round(1000 * self.onnx_latency_s, 3),
                "machine": this_machine().to_json()}


def parameter_count(teacher: Teacher) -> int | None:
    """The number of weights of a teacher's network: a torch module's parameters, an ONNX file's initializers;
    None for teachers without a network (``masks:``, ``probs:``)."""
    for module in _modules(teacher):
        onnx_nets = [m for m in module.modules() if isinstance(m, OnnxNet)]
        if onnx_nets:
            import onnx

            graph = onnx.load(str(onnx_nets[0].path), load_external_data=False).graph
            return int(sum(np.prod(t.dims) for t in graph.initializer))
        return int(sum(p.numel() for p in module.parameters()))
    return None


def _modules(teacher: Teacher) -> list[nn.Module]:
    """The torch modules a teacher runs: a nakt network, a bundle's net, nnU-Net's predictor network."""
    candidates = [getattr(teacher, "model", None), getattr(teacher, "net", None),
                  getattr(getattr(teacher, "predictor", None), "network", None)]
    return [m for m in candidates if isinstance(m, nn.Module)]


def case_cost(teachers: list[Teacher], case: Case, precision: str = "fp32", repeats: int = 5) -> Cost:
    """The cost of one case for `teachers` (one model, or ``nakt label``'s ensemble: each teacher in turn, then
    the mean fusion), in `precision` (``auto`` resolved on the first teacher's device)."""
    device = next((next(m.parameters()).device for t in teachers for m in _modules(t)), torch.device("cpu"))
    precision = resolve_precision(precision, device)
    orientation = reading_orientation(teachers)

    def run() -> None:
        block = next(load_blocks([case], [[0]], orientation, teachers))
        probs = [block_probs(teacher, block, precision)[0] for teacher in teachers]
        if len(probs) > 1:
            fuse(np.stack(probs), "mean")

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    for _ in range(2):  # warm-up outside the counter, which dispatches every op through Python
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    counts = [parameter_count(t) for t in teachers]
    flops = counter.get_total_flops()
    return Cost(parameters=None if None in counts else sum(counts), flops=float(flops) if flops else None,
                latency_s=statistics.median(times), precision=precision)


def onnx_latency(run: str | Path, case: Case, repeats: int = 5) -> float:
    """Median seconds per case of a run exported to ONNX (``nakt export --format onnx``, in a temporary folder)
    and run by ONNX Runtime on the CPU, the same path as `case_cost`. The export's parity check is loosened to 1e-3
    (from the 1e-4 `nakt export` keeps): a timing only needs the same network, and ONNX Runtime's kernels round
    differently enough that a freshly trained mobilenet_v2 Linknet misses 1e-4 (3.2e-4 measured)."""
    with tempfile.TemporaryDirectory() as folder:
        path = export(ExportOptions(model=str(run), format="onnx", out=str(Path(folder) / "model.onnx"), atol=1e-3))
        return case_cost([load_teacher(f"onnx:{path}")], case, "fp32", repeats).latency_s
