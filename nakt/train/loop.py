"""The training loop: AdamW, one-cycle LR, soft Dice + CE, best checkpoint by validation Dice."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from nakt.classify.transfer import apply_unfreezing, make_optimizer
from nakt.inference import probs_on_grid
from nakt.io import rundir
from nakt.metrics import case_scores
from nakt.models.registry import NaktModel
from nakt.train.checkpoint import BestEpoch, TrainingState
from nakt.train.data import Sample, batches, hard_target, spatial_augmenter
from nakt.train.losses import SoftDiceCELoss

__all__ = ["encoder_of", "fit", "validate"]


def encoder_of(model: NaktModel) -> torch.nn.Module | None:
    """The encoder of encoder-decoder nets (smp), which fine-tuning may freeze; None for the others."""
    return getattr(model.net, "encoder", None)


@torch.no_grad()
def validate(model: NaktModel, samples: list[Sample]) -> float:
    """Mean foreground Dice over validation samples, on the network's grid."""
    model.eval()
    scores = []
    for s in samples:
        probs = probs_on_grid(model, s.image[None])[0].cpu()
        scores.append(case_scores(probs.argmax(0).numpy(), hard_target(s.target).numpy(), model.card.classes,
                                  hd95=False)["dice"])
    return float(np.mean(scores))


def fit(model: NaktModel, train: list[Sample], val: list[Sample], run: Path, *, epochs: int, batch_size: int,
        lr: float, weight_decay: float = 1e-4, seed: int = 0, patch=None, patches_per_case: int = 1,
        augment: bool = False, freeze_encoder_epochs: int = 0, min_confidence: float = 0.0,
        spatial_augment: bool = False, recipe: str | None = None, unfreeze_every: int = 1,
        progress: bool = True, resume: bool = False) -> dict:
    """Train `model` in place and keep the best weights (by validation Dice) in ``run/model.safetensors``;
    without validation samples, the last epoch's. With `min_confidence`, pixels whose soft target's largest
    probability is below it are left out of the loss. `spatial_augment` adds random rotations and scalings
    (`spatial_augmenter`). ``recipe="targeted"``: discriminative learning rates over the layer groups (encoder
    stages, decoder, head) and gradual unfreezing from the head, one more group every `unfreeze_every` epochs.

    After every epoch, ``run/training_state.pt`` keeps what continuing needs (`TrainingState`); with `resume`,
    the loop restores it and goes on from the next epoch, ending as an uninterrupted run would (`model`, data
    and options must be rebuilt as the first run had them).

    Returns the metrics: ``history`` (one entry per epoch), ``best_val_dice``, ``best_epoch``.
    """
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    loss_fn = SoftDiceCELoss()
    optimizer = make_optimizer(model, lr, weight_decay, recipe)
    steps_per_epoch = max(1, math.ceil(len(train) * (patches_per_case if patch else 1) / batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=epochs * steps_per_epoch + 1,
                                                   pct_start=0.3 if not freeze_encoder_epochs else 0.1)
    spatial = spatial_augmenter(model.card.spatial_dims, seed) if spatial_augment else None
    encoder = encoder_of(model)
    log = BestEpoch(run, epochs, "dice", "best_val_dice", progress=progress)
    state = TrainingState(run, epochs, log, {"model": model, "optimizer": optimizer, "schedule": schedule},
                          {"batches": rng}, {"spatial": spatial})
    done = state.resume(model) if resume else 0
    for epoch in range(done + 1, epochs + 1):
        t0 = time.time()
        frozen = encoder is not None and epoch <= freeze_encoder_epochs
        if encoder is not None:
            encoder.requires_grad_(not frozen)
        model.train()
        if frozen:
            encoder.eval()  # keep BatchNorm statistics of the frozen encoder
        unfrozen = apply_unfreezing(model, epoch, unfreeze_every) if recipe == "targeted" else None
        losses = []
        for x, y in batches(train, batch_size, model.card.classes, rng, patch, patches_per_case, augment,
                            spatial):
            x, y = x.to(device), y.to(device)
            mask = (y.amax(1, keepdim=True) >= min_confidence).float() if min_confidence > 0 else None
            loss = loss_fn(model(x), y, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        val_dice = validate(model, val) if val else None
        log.update(model, {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
                           "val_dice": val_dice, "lr": schedule.get_last_lr()[0], "encoder_frozen": frozen,
                           "unfrozen_groups": unfrozen, "seconds": round(time.time() - t0, 2)},
                   val_dice, "  (encoder frozen)" if frozen else "", state)
    model.requires_grad_(True)
    log.restore_best(model)
    return rundir.read_metrics(run)
