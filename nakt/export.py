"""`nakt export`: a run directory -> an ONNX or TorchScript file plus its sidecar contract (``FILE.json``).

The file holds the bare network (``[B, C_in, *spatial]`` -> logits, dynamic batch and spatial axes); the
sidecar holds everything nakt needs to feed it (channels, classes, label values, size or patch, normalization,
orientation, size divisor), so ``nakt.load("onnx:FILE")`` / ``nakt.load("torchscript:FILE")`` rebuild a teacher
that gives the run's probabilities with no other flags. Every export is checked against the run before it
appears; a file that does not reproduce the run is never written.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nakt.classify.data import list_images
from nakt.config import at_least, check_device, check_options, option
from nakt.errors import NaktError
from nakt.inference import infer_probs, pick_device, probs_on_grid
from nakt.io.dataset import discover_cases
from nakt.io.images import read_image
from nakt.io.outputs import atomic_path
from nakt.io.sidecar import EXPORT_FORMAT, is_nakt_export, write_sidecar
from nakt.models import NaktModel, load, parse_spec
from nakt.models.card import ModelCard
from nakt.preprocess import prepare_image

__all__ = ["FORMATS", "ExportOptions", "export"]

FORMATS = ("onnx", "torchscript")
# card fields the sidecar carries: the whole input/output contract (the architecture is inside the file)
CONTRACT_KEYS = ("in_channels", "classes", "spatial_dims", "task", "head", "label_values", "class_names", "size",
                 "patch", "normalization", "orientation", "output", "size_divisor")


@dataclass
class ExportOptions:
    """Options of `export` (flag names of ``nakt export``). `images`, when given, adds the first image of that
    folder to the check. `atol` bounds the max abs difference of probabilities between the run and the file.
    `overwrite` replaces an earlier export of nakt's (never a file nakt did not write). `device` runs the check
    (the export itself is traced on the CPU, so the file loads anywhere)."""

    model: str = option(help="run directory to export", group="model")
    format: str = option(help="the file's format", group="model", choices=FORMATS)
    out: str = option(help="file to write (its contract goes to FILE.json)", group="output")
    images: str | None = option(None, "folder whose first image is also compared (default: a random input only)",
                                group="data")
    opset: int = option(17, "ONNX opset", group="model")
    atol: float = option(1e-4, "largest accepted probability difference from the run", group="model")
    overwrite: bool = option(False, "replace an earlier nakt export", group="output")
    device: str = option("cpu", "where the check runs: cpu or cuda")

    def __post_init__(self) -> None:
        check_options(self, {"opset": at_least(9), "atol": at_least(0), "device": check_device})


class _Bare(nn.Module):
    """The run's network alone, first output only (deep-supervision nets return several; the first is full
    size), so the exported graph has one input and one output."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, (list, tuple)) else out


def export(opts: ExportOptions) -> Path:
    """Write ``opts.out`` and ``opts.out + ".json"`` atomically, after checking the file reproduces the run's
    probabilities within `opts.atol`; returns the path of the model file."""
    out = Path(opts.out)
    side = out.with_name(out.name + ".json")
    _claim(out, side, opts.overwrite)
    if parse_spec(str(opts.model))[0] != "run":
        raise NaktError(None, f"--model {opts.model!r} is not a run directory", "export a run of nakt train")
    model = load(opts.model)  # refuses unfinished runs
    contract = {k: getattr(model.card, k) for k in CONTRACT_KEYS}
    sidecar = {"model_format": opts.format, "source": str(opts.model), "architecture": model.card.spec, **contract}
    samples = _samples(model.card, opts.images)
    device = pick_device(opts.device)
    with atomic_path(out) as tmp_model, atomic_path(side) as tmp_side:
        _WRITERS[opts.format](_Bare(model.net).eval(), _example(model.card), tmp_model, opts.opset, opts.model)
        exported = load(f"{opts.format}:{tmp_model}", **contract)
        _check(model.to(device), exported.to(device), samples, opts.atol, out)
        write_sidecar(tmp_side, sidecar)
    return out


def _claim(out: Path, side: Path, overwrite: bool) -> None:
    """Refuse a folder, a file nakt did not write, and (without `overwrite`) an earlier export."""
    if out.is_dir():
        raise NaktError(out, "--out is a folder", "give a file name, e.g. teacher.onnx")
    if not out.exists() and not side.exists():
        return
    if not is_nakt_export(side):
        raise NaktError(out if out.exists() else side, f"exists and is not a nakt export (no {side.name} with "
                        f'"format": "{EXPORT_FORMAT}")', "nakt never overwrites files it did not write: "
                        "choose a new --out")
    if not overwrite:
        raise NaktError(out, "holds a nakt export already", "choose a new --out, or pass --overwrite")


def _grid(card: ModelCard) -> list[int]:
    """The grid the network sees: the patch, else the size, else (native-size inference) 64 / 32 per axis."""
    dims = card.spatial_dims
    grid = card.patch or card.size or [64 if dims == 2 else 32]
    return list(grid) * dims if len(grid) == 1 else list(grid)


def _example(card: ModelCard) -> torch.Tensor:
    """A tracing input ``[1, C_in, *grid]``, the grid padded up to the size divisor as `NaktModel` pads it."""
    div = card.size_divisor
    return torch.randn(1, card.in_channels, *[s + (-s) % div for s in _grid(card)])


def _export_onnx(net: nn.Module, x: torch.Tensor, path: Path, opset: int, source: str) -> None:
    # The legacy TorchScript-based exporter (dynamo=False): with torch 2.14 it exports smp Unet/resnet18, monai
    # UNet (3D) and timm classifiers, matching to ~1e-5 at other batch sizes and spatial shapes, and needs only
    # the onnx extra. The dynamo exporter matches too, but needs onnxscript (not in the extra), is 3-10x slower
    # here and does not honour opset 17 (its down-conversion fails on these graphs and leaves opset 18).
    with torch.no_grad():
        dense = net(x).ndim == x.ndim
    axes = {0: "batch", **{i: f"axis{i}" for i in range(2, x.ndim)}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter; the result is checked below
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=opset, input_names=["image"],
                              output_names=["logits"], do_constant_folding=True,
                              dynamic_axes={"image": axes, "logits": axes if dense else {0: "batch"}})
    except ImportError as exc:
        raise NaktError(None, f'ONNX export needs the onnx extra: pip install "nakt[onnx]" ({exc.name})') from None
    except Exception as exc:
        raise NaktError(source, f"cannot export to ONNX opset {opset} ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})") from None


def _export_torchscript(net: nn.Module, x: torch.Tensor, path: Path, opset: int, source: str) -> None:
    # Tracing records the convolutions, not Python control flow; nakt's nets have none that depends on input
    # values, and the check below catches a shape baked into the graph.
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(net, x, check_trace=False), str(path))
    except Exception as exc:
        raise NaktError(source, f"cannot trace to TorchScript ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})") from None


_WRITERS: dict[str, Callable[[nn.Module, torch.Tensor, Path, int, str], None]] = {
    "onnx": _export_onnx, "torchscript": _export_torchscript}


def _samples(card: ModelCard, images: str | None) -> list[tuple[str, object]]:
    """What the check feeds both models: ``(description, tensor [B, C_in, *grid] or raw image [C, *spatial])``.

    Random inputs: a batch of two on the card's grid (dynamic batch), and for native-size inference also an odd
    grid (dynamic spatial axes and the padding); then the first image of `images`, raw, as inference sees it.
    """
    gen = torch.Generator().manual_seed(0)
    grid = _grid(card)
    shapes = [grid] if (card.size or card.patch) else [grid, [s + card.size_divisor + 3 for s in grid]]
    samples: list[tuple[str, object]] = [(f"a random input {[2, card.in_channels, *shape]}",
                                          torch.randn(2, card.in_channels, *shape, generator=gen))
                                         for shape in shapes]
    if images is not None:
        path, array = _first_image(card, images)
        samples.append((str(path), array))
    return samples


def _first_image(card: ModelCard, images: str) -> tuple[Path, np.ndarray]:
    if card.task == "classification":
        path = list_images(images)[0]
        return path, read_image(path).array

    case = discover_cases(images)[0]
    return case.images[0], read_image(case.images, orientation=card.orientation).array


def _probs(model: NaktModel, sample: object) -> np.ndarray:
    """Probabilities for one sample: prepared tensors through `probs_on_grid` (sliding windows included), raw
    images through `infer_probs` (segmentation) or the classifier's own preprocessing."""
    if isinstance(sample, torch.Tensor):
        return probs_on_grid(model, sample).cpu().numpy()
    if model.card.task == "classification":
        device = next(model.parameters()).device
        with torch.no_grad():
            return model.predict_proba(prepare_image(sample, model.card)[None].to(device)).float().cpu().numpy()
    return infer_probs(model, sample)


def _check(native: NaktModel, exported: NaktModel, samples: list, atol: float, out: Path) -> None:
    for what, sample in samples:
        diff = float(np.abs(_probs(native, sample) - _probs(exported, sample)).max())
        if not diff <= atol:  # `not <=` also catches NaN
            raise NaktError(out, f"the exported model differs from the run by {diff:.2g} in probability on {what}"
                            f" (more than --atol {atol:g}); nothing was written",
                            "a layer may not export faithfully; try the other --format")
