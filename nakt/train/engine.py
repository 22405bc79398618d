"""One training engine for every task: the epoch loop, its optimizer and one-cycle schedule, precision, freezing
(``freeze_encoder_epochs`` and the targeted recipe's gradual unfreezing), EMA, online teachers, the best
checkpoint, metrics.json and the resume state.

A task (segmentation, classification) is a small adapter (`Task`) that supplies a Dataset of training samples,
the loss, the validation score and which parameters are its "encoder"; the engine never asks which task it
trains. Batches come from a DataLoader (`nakt.train.loader`); under torchrun the model is wrapped in
DistributedDataParallel and every rank reads its share of each global batch, rank 0 alone validating and
writing. The step is
MONAI's ``SupervisedTrainer._iteration`` / detectron2's ``SimpleTrainer.run_step``: batch -> forward under
autocast -> loss -> backward -> step; the per-epoch bookkeeping (best epoch, files, resume) is
`nakt.train.checkpoint`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from nakt.classify.roskd import ema_model
from nakt.classify.transfer import apply_unfreezing, make_optimizer
from nakt.errors import NaktError
from nakt.inference import autocast, resolve_precision
from nakt.io import rundir
from nakt.machine import channels_last_pays
from nakt.models.registry import NaktModel
from nakt.sharding import collective_device
from nakt.train.checkpoint import BestEpoch, TrainingState
from nakt.train.loader import PlannedLoader, plan_epoch
from nakt.train.online import OnlineTeachers

__all__ = ["FitOptions", "Task", "fit", "freeze", "uses_channels_last"]


@dataclass(kw_only=True)
class FitOptions:
    """What the engine takes from `nakt.train.TrainOptions` (the same names; `of` picks them).

    `freeze_encoder_epochs`: the task's encoder (`Task.encoder`) does not train in the first epochs, its
    BatchNorm statistics kept. ``recipe="targeted"``: discriminative learning rates and gradual unfreezing, one
    more layer group every `unfreeze_every` epochs. `ema`: the scored and saved model is an exponential moving
    average of the weights with this decay (`nakt.classify.roskd.ema_model`). `precision`: ``auto``
    (bf16 on GPUs, fp16 on those before Ampere, and bf16 on CPUs that compute bfloat16 natively, else fp32;
    `nakt.inference.resolve_precision`),
    ``fp32``, ``bf16`` or ``fp16`` (with a gradient scaler). `batch_size` is the global batch, split between
    the processes of a distributed run; `num_workers` DataLoader processes prepare the samples. `compile`:
    the training forward and backward run through ``torch.compile`` (Inductor; the first steps compile).
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
    precision: str = "auto"
    num_workers: int = 0
    compile: bool = False
    progress: bool = True

    @classmethod
    def of(cls, opts) -> FitOptions:
        """The fields of `opts` (a `TrainOptions`) that the engine uses; loader workers left to the default
        (None) are none here (the task adapters choose them before: `nakt.train.setup.loader_workers`)."""
        values = {f.name: getattr(opts, f.name) for f in fields(cls)}
        return cls(**{**values, "num_workers": values["num_workers"] or 0})


class Task(Protocol):
    """What a task adapter supplies to `fit`.

    `samples[(index, seed)]` is one training sample, a dict ``{"image": [C_in, *grid], "target": ...}`` whose
    random crop and augmentation come from `seed` alone; the DataLoader stacks them into batches, which the
    engine moves to the device and, with online teachers, completes with ``"teacher_probs"`` (the drawn
    teachers' fused probabilities on the same augmented images, the shape of the network's output).
    """

    metric: str  # the validation score's name in metrics.json and the progress line ("dice", "auc")
    samples: torch.utils.data.Dataset

    def epoch_size(self) -> int:
        """Samples in one epoch (sizes the one-cycle schedule)."""
        ...

    def order(self, rng: np.random.Generator) -> np.ndarray:
        """The sample indices of one epoch, in order, drawn with `rng` (saved in the resume state)."""
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
    """NHWC for 2D segmentation networks wherever `nakt.machine.channels_last_pays` (GPUs, CPUs with AVX2 or
    better): a Unet/resnet18 training step at 128 px, batch 8, ran 1.13-1.3x faster channels-last than NCHW with
    the ISA capped to AVX2, on AVX-512 in fp32 and under bf16 autocast (benchmarks/training_throughput.py
    measures the whole run). Classifiers train NCHW on the CPU (on GPUs NHWC): not measured for them there."""
    if model.card.task != "segmentation":
        return model.card.spatial_dims == 2 and device.type == "cuda"
    return channels_last_pays(device, model.card.spatial_dims)


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
    schedule -> EMA. Returns the loss.

    With ``--compile``, `forward` is the compiled graph and `eager` the same module uncompiled: the first step
    runs both (`_checked_compilation`) and keeps the compiled graph only if it agrees."""

    model: NaktModel
    forward: nn.Module  # the model, or its DistributedDataParallel wrapper; compiled with --compile
    task: Task
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    smoothed: nn.Module | None
    teachers: OnlineTeachers | None
    precision: str
    nhwc: bool
    eager: nn.Module | None = None  # set while a compiled `forward` has not yet been checked against it

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        if self.nhwc:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        if self.teachers is not None:  # online: the drawn teacher(s) see the same augmented batch
            with autocast(self.precision, device):
                batch["teacher_probs"] = self.teachers(batch["image"])
        self.optimizer.zero_grad(set_to_none=True)
        if self.eager is not None:
            loss = self._checked_compilation(batch)
        else:
            loss = self._backward(self.forward, batch)[1]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.schedule.step()
        if self.smoothed is not None:
            self.smoothed.update_parameters(self.model)
        return loss.item()

    def _backward(self, forward: nn.Module, batch: dict[str, torch.Tensor],
                  precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss and backward (scaled for fp16) through `forward` at `precision` (default the run's);
        returns (output, loss)."""
        with autocast(precision or self.precision, batch["image"].device):
            output = forward(batch["image"]).float()
            loss = self.task.loss(output, batch)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return output.detach(), loss.detach()

    def _checked_compilation(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The first compiled step against the eager one on the same batch (output, loss and every gradient,
        under DDP both averaged over the ranks; `_agrees`): a compiled graph that disagrees is dropped for the
        rest of the run, with a line, and the step is the eager one. Inductor's CPU code has trained to NaN where
        the eager network did not (a channels-last monai:UNet with the ISA capped to AVX2), so a compiled graph
        is trusted only once it has agreed. In reduced precision an eager fp32 step on the same batch is the
        reference both are measured against. BatchNorm statistics are restored between the passes, so they move
        once, as without the check."""
        buffers = [b.detach().clone() for b in self.model.buffers()]
        params = [p for p in self.model.parameters() if p.requires_grad]
        reference = self._checking_pass(self.eager, batch, params, buffers, "fp32") \
            if self.precision != "fp32" else None
        eager_step = self._checking_pass(self.eager, batch, params, buffers)
        output, loss = self._backward(self.forward, batch)
        eager, self.eager = self.eager, None
        if _agrees((output, loss, [p.grad for p in params]), eager_step, reference):
            return loss
        self.forward = eager
        print(f"nakt: --compile: the compiled training step disagrees with the eager one on the first batch (loss "
              f"{loss.item():.6g} against {eager_step[1].item():.6g}): training eagerly", file=sys.stderr)
        self._rewind(buffers)
        return self._backward(eager, batch)[1]

    def _checking_pass(self, forward: nn.Module, batch: dict[str, torch.Tensor], params: list[nn.Parameter],
                       buffers: list[torch.Tensor], precision: str | None = None) -> tuple:
        """One pass of `_checked_compilation`, undone: (output, loss, gradients of `params`)."""
        output, loss = self._backward(forward, batch, precision)
        grads = [p.grad for p in params]
        self._rewind(buffers)
        return output, loss, grads

    def _rewind(self, buffers: list[torch.Tensor]) -> None:
        """Undo a pass of `_checked_compilation`: the model's buffers (BatchNorm statistics) back to `buffers`,
        no gradients."""
        for b, kept in zip(self.model.buffers(), buffers):
            b.copy_(kept)
        self.optimizer.zero_grad(set_to_none=True)


# how far a compiled fp32 step may be from the eager one: output and loss (largest difference relative to the
# largest magnitude), each gradient (`_gradient_distance`)
FP32_TOLERANCES = (1e-3, 1e-3, 5e-2)


def _agrees(compiled: tuple, eager: tuple, reference: tuple | None = None) -> bool:
    """Whether a compiled training step (output, loss, gradients) agrees with the `eager` one. In fp32 (no
    `reference`): within `FP32_TOLERANCES` of it. In reduced precision the eager step is itself far from exact
    (under bf16 autocast a fresh smp Unet/resnet18's logits 11.6% of their largest and its gradients up to 69%
    per tensor, 31% overall, from float64; a compiled step as far: `benchmarks/compile_gradients.py --precision
    bf16`): each distance from the fp32 `reference` may be at most twice the eager step's, plus the fp32
    tolerance. A wrong graph (NaN, a scaled gradient) is off by far more."""
    if reference is None:
        return all(d <= t for d, t in zip(_distances(compiled, eager), _expand(FP32_TOLERANCES, compiled)))
    own = _distances(eager, reference)
    return all(d <= 2 * e + t for d, e, t in zip(_distances(compiled, reference), own,
                                                 _expand(FP32_TOLERANCES, compiled)))


def _expand(tolerances: tuple, step: tuple) -> list[float]:
    """`tolerances` (output, loss, gradients) with the gradients' one repeated for each of `step`'s gradients."""
    return [tolerances[0], tolerances[1], *[tolerances[2]] * len(step[2])]


def _distances(step: tuple, reference: tuple) -> list[float]:
    """How far a step (output, loss, gradients) is from `reference`: output and loss by their largest difference
    relative to the reference's largest magnitude, then each gradient (`_gradient_distance`); inf for a value
    that is not finite or a gradient that only one side has."""
    (output, loss, grads), (ref_output, ref_loss, ref_grads) = step, reference
    largest = max((float(g.norm()) for g in ref_grads if g is not None), default=0.0)
    gradients = [0.0 if g is None and r is None else math.inf if g is None or r is None
                 else _gradient_distance(g, r, largest) for g, r in zip(grads, ref_grads)]
    return [_relative_difference(output, ref_output), _relative_difference(loss, ref_loss), *gradients]


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest elementwise difference of `a` from `b` relative to b's largest magnitude (inf if `a` is not
    finite)."""
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return 0.0 if a.numel() == 0 else float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6)


def _gradient_distance(a: torch.Tensor, b: torch.Tensor, largest: float) -> float:
    """A gradient `a`'s distance from `b` in relative L2 norm, the norm taken as at least 1e-3 of the `largest`
    gradient norm in the model (inf if `a` is not finite). Not elementwise: BatchNorm's backward subtracts
    means, and its rounding leaves fp32 gradients of a freshly built smp Unet/resnet18 about 1% (relative L2, per
    tensor) from their float64 values in eager mode as well as compiled (benchmarks/compile_gradients.py); and
    the bias of a convolution followed by BatchNorm has a gradient of zero but for rounding."""
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - b).norm()) / max(float(b.norm()), 1e-3 * largest, 1e-30)


def fit(model: NaktModel, task: Task, run: Path, opts: FitOptions, teachers: OnlineTeachers | None = None,
        resume: bool = False) -> dict:
    """Train `model` in place on `task` and keep the best epoch's weights (by the task's validation score; the
    last epoch's without validation) in ``run/model.safetensors``; the best weights are in `model` at the end.

    After every epoch ``run/training_state.pt`` keeps what continuing needs (`TrainingState`: model, EMA,
    optimizer, schedule, gradient scaler, the epoch-plan and teacher-draw generators, the best so far); with
    `resume` the loop restores it and goes on from the next epoch, ending as an uninterrupted run would
    (`model`, `task` and `teachers` rebuilt as the first run had them).

    In a distributed run (a process group is initialised, `nakt.sharding.process_group`) every process calls
    `fit` with the same arguments; the model is wrapped in DistributedDataParallel, each rank trains on its share
    of every global batch of `opts.batch_size`, and rank 0 validates and writes the files.

    Returns metrics.json: ``history`` (one entry per epoch), ``best_val_score``, ``best_val_metric``,
    ``best_epoch``, ``precision`` (the resolved one).
    """
    device = next(model.parameters()).device
    rank, world = _rank_and_world()
    precision = resolve_precision(opts.precision, device)
    nhwc = uses_channels_last(model, device)
    if nhwc:
        model.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(opts.seed)
    torch.manual_seed(opts.seed)
    optimizer = make_optimizer(model, opts.lr, opts.weight_decay, opts.recipe)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=opts.epochs * max(1, math.ceil(task.epoch_size() / opts.batch_size)) + 1,
        pct_start=0.1 if opts.freeze_encoder_epochs else 0.3)  # short warm-up when the first epochs are frozen
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None  # bf16 needs no loss scaling
    smoothed = ema_model(model, opts.ema) if opts.ema else None
    scored = smoothed.module if smoothed is not None else model
    log = BestEpoch(run, opts.epochs, task.metric, {"precision": precision}, opts.progress, main=rank == 0)
    generators = {"batches": rng} if teachers is None else {"batches": rng, "teachers": teachers.rng}
    state = TrainingState(run, opts.epochs, log, {"model": model, "ema": smoothed, "optimizer": optimizer,
                                                  "schedule": schedule, "scaler": scaler}, generators)
    done = state.resume(scored) if resume else 0
    eager = _distributed(model, opts) if world > 1 else model
    # validation and saving keep using `model`, which shares the weights
    forward = compile_for_training(eager) if opts.compile else eager
    step = _Step(model, forward, task, optimizer, schedule, scaler, smoothed, teachers, precision, nhwc,
                 eager=eager if opts.compile else None)
    encoder = set(task.encoder(model)) if opts.freeze_encoder_epochs else set()
    loader = PlannedLoader(task.samples, opts.num_workers, rank, world)
    for epoch in range(done + 1, opts.epochs + 1):
        t0 = time.time()
        frozen, unfrozen = _trainable(model, epoch, opts, encoder)
        plan = plan_epoch(task.order(rng), opts.batch_size, rng, world)
        losses = [step(batch) for batch in loader.epoch(plan)]
        train_loss = _mean_over_ranks(losses, world)
        if train_loss is not None and not math.isfinite(train_loss):  # every rank sees the same mean
            remedies = ["a lower --lr"] + (["--precision fp32"] if precision != "fp32" else []) + (
                ["no --compile"] if opts.compile else [])
            raise NaktError(run, f"the training loss became {train_loss} in epoch {epoch} (precision {precision}"
                            f"{', compiled' if opts.compile else ''}); the run keeps its earlier epochs",
                            "rerun with " + ", ".join(remedies))
        t_val = time.time()
        score = task.validate(scored, precision, opts.batch_size) if rank == 0 else None
        log.update(scored, {"epoch": epoch, "train_loss": train_loss, "val_score": score,
                            "lr": schedule.get_last_lr()[-1], "encoder_frozen": frozen,
                            "unfrozen_groups": unfrozen, "samples": sum(len(b) for b in plan),
                            "seconds": round(time.time() - t0, 2), "val_seconds": round(time.time() - t_val, 2)},
                   score, "  (encoder frozen)" if frozen else "", state)
    model.requires_grad_(True)
    if world > 1:
        torch.distributed.barrier()  # rank 0's files are complete before anyone reads them
    log.restore_best(model)
    if nhwc:
        model.to(memory_format=torch.contiguous_format)
    return rundir.read_metrics(run)


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def compile_for_training(module: nn.Module) -> nn.Module:
    """`module` through ``torch.compile`` (Inductor): its forward and backward compile on the first steps."""
    return torch.compile(module)


def _distributed(model: NaktModel, opts: FitOptions) -> nn.Module:
    """`model` in DistributedDataParallel. Frozen phases (encoder freezing, gradual unfreezing) leave parameters
    without gradients in some steps, which DDP must be told to expect."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    partial = bool(opts.freeze_encoder_epochs) or opts.recipe == "targeted"
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=partial)


def _mean_over_ranks(losses: list[float], world: int) -> float | None:
    """The epoch's mean training loss, averaged over the processes of a distributed run."""
    mean = float(np.mean(losses)) if losses else None
    if world == 1 or mean is None:
        return mean
    total = torch.tensor([mean], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(total)
    return float(total.item()) / world
