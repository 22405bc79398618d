"""One training engine for every task: the epoch loop, its optimizer and one-cycle schedule, precision, freezing
(``freeze_encoder_epochs`` and the targeted recipe's gradual unfreezing), EMA, online teachers, the best
checkpoint, metrics.json and the resume state.

A task (segmentation, classification) is a small adapter (`Task`) that supplies the batches, the loss, the
validation score and which parameters are its "encoder"; the engine never asks which task it trains. The step is
MONAI's ``SupervisedTrainer._iteration`` / detectron2's ``SimpleTrainer.run_step``: batch -> forward under
autocast -> loss -> backward -> step; the per-epoch bookkeeping (best epoch, files, resume) is
`nakt.train.checkpoint`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from nakt.batched import autocast, resolve_precision
from nakt.classify.roskd import TeacherSampler, ema_model
from nakt.classify.transfer import apply_unfreezing, make_optimizer
from nakt.io import rundir
from nakt.models.registry import NaktModel
from nakt.train.checkpoint import BestEpoch, TrainingState

__all__ = ["FitOptions", "Task", "fit", "freeze", "uses_channels_last"]


@dataclass(kw_only=True)
class FitOptions:
    """What the engine takes from `nakt.train.TrainOptions` (the same names; `of` picks them).

    `freeze_encoder_epochs`: the task's encoder (`Task.encoder`) does not train in the first epochs, its
    BatchNorm statistics kept. ``recipe="targeted"``: discriminative learning rates and gradual unfreezing, one
    more layer group every `unfreeze_every` epochs. `ema`: the scored and saved model is an exponential moving
    average of the weights with this decay (`nakt.classify.roskd.ema_model`). `teacher_mode`: how online
    teachers supervise each step (``random``: one drawn per step, RoS-KD; ``mean``: all). `precision`: ``auto``
    (bf16 on GPUs and on CPUs that compute bfloat16 natively, else fp32; `nakt.batched.resolve_precision`),
    ``fp32``, ``bf16`` or ``fp16`` (with a gradient scaler).
    """

    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    freeze_encoder_epochs: int = 0
    recipe: str | None = None
    unfreeze_every: int = 1
    ema: float | None = None
    teacher_mode: str = "random"
    precision: str = "auto"
    progress: bool = True

    @classmethod
    def of(cls, opts) -> FitOptions:
        """The fields of `opts` (a `TrainOptions`) that the engine uses."""
        return cls(**{f.name: getattr(opts, f.name) for f in fields(cls)})


class Task(Protocol):
    """What a task adapter supplies to `fit`.

    A batch is a dict ``{"image": [B, C_in, *grid], "target": ...}`` on the CPU; the engine moves it to the
    device and, with online teachers, adds ``"teacher_probs"`` (the drawn teachers' mean probabilities on the
    same images, the target's shape).
    """

    metric: str  # the validation score's name in metrics.json and the progress line ("dice", "auc")
    transforms: dict[str, object]  # random MONAI transforms whose generators the resume state keeps

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps in one epoch (sizes the one-cycle schedule)."""
        ...

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch of training batches, drawn with `rng` (saved in the resume state)."""
        ...

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar loss of `logits` ``[B, K, *grid]`` (float32) for `batch`."""
        ...

    def validate(self, model: NaktModel, precision: str, batch_size: int) -> float | None:
        """The validation score (higher is better), or None without validation data."""
        ...

    def encoder(self, model: NaktModel) -> list[str]:
        """Names of the parameters `freeze_encoder_epochs` freezes (empty: nothing to freeze)."""
        ...


def uses_channels_last(model: NaktModel, device: torch.device) -> bool:
    """NHWC for 2D networks on GPUs, where cuDNN's (tensor-core) convolutions want it. On the CPU training stays
    NCHW: per-step timings of UNet/ResNet training on 2 shared cores went both ways (unlike inference, where
    `nakt.batched` measured NHWC 1.5x faster), so nothing showed it helps there."""
    return model.card.spatial_dims == 2 and device.type == "cuda"


def freeze(model: nn.Module, names: set[str]) -> None:
    """Stop gradients of the parameters `names`, and keep the running statistics of BatchNorm layers whose
    parameters are all among them (a frozen encoder must not drift on the new data)."""
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = [f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)]
            if own and all(n in names for n in own):
                module.eval()


def _trainable(model: NaktModel, epoch: int, opts: FitOptions, encoder: set[str]) -> tuple[bool, list | None]:
    """Set which parameters train in `epoch`; returns (encoder frozen, the targeted recipe's group flags)."""
    model.train()
    unfrozen = None
    if opts.recipe == "targeted":
        unfrozen = apply_unfreezing(model, epoch, opts.unfreeze_every)
    else:
        model.requires_grad_(True)
    frozen = bool(encoder) and epoch <= opts.freeze_encoder_epochs
    if frozen:
        freeze(model, encoder)
    return frozen, unfrozen


@dataclass
class _Step:
    """One optimizer step (MONAI's ``_iteration``, detectron2's ``run_step``): batch to the device -> forward
    and loss under autocast (online teachers on the same images) -> backward (scaled for fp16) -> step ->
    schedule -> EMA. Returns the loss."""

    model: NaktModel
    task: Task
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    smoothed: nn.Module | None
    teachers: Sequence[NaktModel]
    sampler: TeacherSampler | None
    precision: str
    nhwc: bool

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        if self.nhwc:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, device):
            if self.sampler is not None:  # online: the drawn teacher(s) see the same augmented batch
                with torch.no_grad():
                    batch["teacher_probs"] = torch.stack([self.teachers[k].predict_proba(batch["image"]).float()
                                                          for k in self.sampler.draw()]).mean(0)
            loss = self.task.loss(self.model(batch["image"]).float(), batch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.schedule.step()
        if self.smoothed is not None:
            self.smoothed.update_parameters(self.model)
        return loss.item()


def fit(model: NaktModel, task: Task, run: Path, opts: FitOptions, teachers: Sequence[NaktModel] = (),
        resume: bool = False) -> dict:
    """Train `model` in place on `task` and keep the best epoch's weights (by the task's validation score; the
    last epoch's without validation) in ``run/model.safetensors``; the best weights are in `model` at the end.

    After every epoch ``run/training_state.pt`` keeps what continuing needs (`TrainingState`: model, EMA,
    optimizer, schedule, gradient scaler, the batch and teacher-draw generators, the task's random transforms,
    the best so far); with `resume` the loop restores it and goes on from the next epoch, ending as an
    uninterrupted run would (`model`, `task` and `teachers` rebuilt as the first run had them).

    Returns metrics.json: ``history`` (one entry per epoch), ``best_val_score``, ``best_val_metric``,
    ``best_epoch``, ``precision`` (the resolved one).
    """
    device = next(model.parameters()).device
    precision = resolve_precision(opts.precision, device)
    nhwc = uses_channels_last(model, device)
    if nhwc:
        model.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(opts.seed)
    torch.manual_seed(opts.seed)
    optimizer = make_optimizer(model, opts.lr, opts.weight_decay, opts.recipe)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=opts.epochs * task.steps_per_epoch(opts.batch_size) + 1,
        pct_start=0.1 if opts.freeze_encoder_epochs else 0.3)  # short warm-up when the first epochs are frozen
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None  # bf16 needs no loss scaling
    smoothed = ema_model(model, opts.ema) if opts.ema else None
    scored = smoothed.module if smoothed is not None else model
    sampler = TeacherSampler(len(teachers), opts.teacher_mode, opts.seed) if teachers else None
    log = BestEpoch(run, opts.epochs, task.metric, {"precision": precision}, opts.progress)
    generators = {"batches": rng} if sampler is None else {"batches": rng, "teachers": sampler.rng}
    state = TrainingState(run, opts.epochs, log, {"model": model, "ema": smoothed, "optimizer": optimizer,
                                                  "schedule": schedule, "scaler": scaler}, generators, task.transforms)
    done = state.resume(scored) if resume else 0
    step = _Step(model, task, optimizer, schedule, scaler, smoothed, teachers, sampler, precision, nhwc)
    encoder = set(task.encoder(model)) if opts.freeze_encoder_epochs else set()
    for epoch in range(done + 1, opts.epochs + 1):
        t0 = time.time()
        frozen, unfrozen = _trainable(model, epoch, opts, encoder)
        losses = [step(batch) for batch in task.batches(rng, opts.batch_size)]
        score = task.validate(scored, precision, opts.batch_size)
        log.update(scored, {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
                            "val_score": score, "lr": schedule.get_last_lr()[-1], "encoder_frozen": frozen,
                            "unfrozen_groups": unfrozen, "seconds": round(time.time() - t0, 2)},
                   score, "  (encoder frozen)" if frozen else "", state)
    model.requires_grad_(True)
    log.restore_best(model)
    if nhwc:
        model.to(memory_format=torch.contiguous_format)
    return rundir.read_metrics(run)
