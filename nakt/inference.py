"""One inference core: a model and a raw image -> class probabilities on the image's own grid."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from nakt.models.registry import NaktModel
from nakt.preprocess import prepare_image, resize

__all__ = ["infer_probs", "pick_device", "probs_on_grid"]


def pick_device(device: str | None = "auto") -> torch.device:
    """``auto`` takes the GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def probs_on_grid(model: NaktModel, x: torch.Tensor, autocast: bool = True) -> torch.Tensor:
    """Probabilities ``[B, C, *grid]`` for prepared inputs ``[B, C_in, *grid]`` (sliding windows when the
    model card has a patch size). `autocast`: bf16 on GPUs; False leaves precision to the caller."""
    device = next(model.parameters(), torch.empty(0)).device
    x = x.to(device)
    with _autocast(device) if autocast else nullcontext():
        if model.card.patch:
            from monai.inferers import sliding_window_inference

            patch = list(model.card.patch) * (x.ndim - 2) if len(model.card.patch) == 1 else model.card.patch
            out = sliding_window_inference(x, roi_size=patch, sw_batch_size=4, predictor=model.predict_proba,
                                           overlap=0.25, mode="gaussian")
        else:
            out = model.predict_proba(x)
    return out.float()


@torch.no_grad()
def infer_probs(model: NaktModel, image: np.ndarray, path: Path | None = None) -> np.ndarray:
    """Class probabilities ``[C, *spatial]`` (float32) for a raw image ``[C_img, *spatial]``, mapped back to
    the image's own grid whatever size or patching the model uses."""
    model.eval()
    x = prepare_image(image, model.card, path)
    probs = probs_on_grid(model, x[None])[0].cpu()
    probs = resize(probs, tuple(image.shape[1:]))
    probs = probs.clamp_min(0)
    return (probs / probs.sum(0, keepdim=True).clamp_min(1e-8)).numpy()
