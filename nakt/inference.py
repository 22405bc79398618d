"""The one inference core: prepared inputs -> a network's probabilities (precision, channels-last, sliding
windows, flip TTA) -> each image's own grid.

`net_probs` runs a batch of same-shape prepared inputs; `to_image_grid` maps one case's probabilities back to
its image. Batched labelling, prediction and evaluation (`nakt.batched.block_probs`) and the single-case
`infer_probs` (a batch of one) both go through these two functions, so a case gets the same probabilities
however it is run.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from nakt.machine import channels_last_pays, cpu_has_bf16
from nakt.models.registry import NaktModel
from nakt.preprocess import prepare_image, resize

__all__ = ["LAYOUTS", "PRECISIONS", "TTAS", "autocast", "compile_for_inference", "cpu_has_bf16", "infer_probs",
           "net_probs", "pick_device", "probs_on_grid", "probs_to_grid", "resolve_layout", "resolve_precision",
           "to_image_grid"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TTAS = ("none", "flip")
LAYOUTS = ("auto", "channels-last", "contiguous")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str | None = "auto") -> torch.device:
    """``auto`` takes the GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on GPUs and on CPUs that compute bfloat16 natively, else ``fp32``; others unchanged.
    GPUs before Ampere (V100, T4) have no bfloat16 units (torch emulates it, slowly): ``auto`` is ``fp16`` there,
    which training pairs with a gradient scaler. (On 2 AVX512-BF16 cores bf16 autocast ran 2D segmentation
    networks ~2x faster; benchmarks/throughput.py measures how often its labels differ from fp32's.)

    >>> resolve_precision("fp16", torch.device("cpu"))
    'fp16'
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def resolve_layout(layout: str, device: torch.device, spatial_dims: int) -> bool:
    """True for channels-last (NHWC) inputs and weights: ``auto`` asks `nakt.machine.channels_last_pays`;
    ``channels-last`` and ``contiguous`` force it (3D inputs always stay contiguous).

    >>> resolve_layout("contiguous", torch.device("cpu"), 2)
    False
    """
    if spatial_dims != 2:
        return False
    return channels_last_pays(device, spatial_dims) if layout == "auto" else layout == "channels-last"


def autocast(precision: str, device: torch.device):
    """The autocast context of a resolved `precision` (``fp32``: none) on `device`'s type."""
    return nullcontext() if precision == "fp32" else torch.autocast(device.type, dtype=_DTYPES[precision])


def compile_for_inference(model: NaktModel) -> None:
    """Compile `model`'s network in place with Inductor (``torch.compile``), its weights frozen into the graph
    as constants (``freezing``: inference only; folds BatchNorms and pre-packs convolution weights). Each new
    input shape compiles on its first call (tens of seconds on a CPU), so it pays only on long runs: measure it
    with benchmarks/compile_bench.py. State dict keys stay as they were."""
    model.net.compile(dynamic=False, options={"freezing": True})


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


@torch.no_grad()
def probs_on_grid(model: NaktModel, x: torch.Tensor) -> torch.Tensor:
    """Probabilities ``[B, C, *grid]`` (float32, on the model's device) for prepared inputs ``[B, C_in, *grid]``
    (sliding windows when the model card has a patch size), in the caller's precision (`autocast`)."""
    x = x.to(model_device(model))
    if model.card.patch:
        from monai.inferers import sliding_window_inference

        patch = list(model.card.patch) * (x.ndim - 2) if len(model.card.patch) == 1 else model.card.patch
        out = sliding_window_inference(x, roi_size=patch, sw_batch_size=4, predictor=model.predict_proba,
                                       overlap=0.25, mode="gaussian")
    else:
        out = model.predict_proba(x)
    return out.float()


def net_probs(model: NaktModel, x: torch.Tensor, precision: str = "fp32", tta: str = "none",
              channels_last: bool | None = None) -> torch.Tensor:
    """Probabilities ``[B, C, *grid]`` (float32, CPU) for prepared inputs ``[B, C_in, *grid]`` of one shape, under
    a resolved `precision` (`resolve_precision`), with 2D inputs channels-last when `channels_last` (None: the
    machine's choice, `resolve_layout`); the model's weights should be in the same layout.

    ``tta="flip"`` averages the image and its mirror along the last axis, both in one batch of ``2B``.
    """
    device = model_device(model)
    x = x.to(device)
    if tta == "flip":
        x = torch.cat([x, x.flip(-1)])
    if channels_last is None:
        channels_last = resolve_layout("auto", device, x.ndim - 2)
    if channels_last and x.ndim == 4:  # NHWC: cuDNN's and oneDNN's fast convolutions
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(precision, device):
        probs = probs_on_grid(model, x)
    if tta == "flip":
        half = len(probs) // 2
        probs = (probs[:half] + probs[half:].flip(-1)) / 2
    return probs.cpu()


def probs_to_grid(probs: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Probabilities ``[B, C, *grid]`` -> ``[B, C, *spatial]``: resized as `nakt.preprocess.resize` resizes
    images, clamped at 0 and renormalised to sum to 1 over C (interpolation can leave them slightly off)."""
    if tuple(probs.shape[2:]) != tuple(spatial):
        probs = torch.stack([resize(p, tuple(spatial)) for p in probs.float()])
    probs = probs.clamp_min(0)
    return probs / probs.sum(1, keepdim=True).clamp_min(1e-8)


def to_image_grid(probs: torch.Tensor, spatial: tuple[int, ...]) -> np.ndarray:
    """One case's probabilities ``[C, *grid]`` -> ``[C, *spatial]`` (float32 array) on its image's grid
    (`probs_to_grid`).

    >>> to_image_grid(torch.full((2, 4, 4), 0.5), (8, 6)).shape
    (2, 8, 6)
    """
    return probs_to_grid(probs[None], spatial)[0].numpy()


def infer_probs(model: NaktModel, image: np.ndarray, path: Path | None = None, precision: str = "fp32",
                tta: str = "none") -> np.ndarray:
    """Class probabilities ``[C, *spatial]`` (float32) for a raw image ``[C_img, *spatial]``, mapped back to
    the image's own grid whatever size or patching the model uses: a batch of one through `net_probs`."""
    model.eval()
    x = prepare_image(image, model.card, path)
    return to_image_grid(net_probs(model, x[None], precision, tta)[0], tuple(image.shape[1:]))
