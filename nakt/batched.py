"""Batched inference for many cases and several teachers: images are decoded and prepared once (in DataLoader
workers) for all teachers, each network (`NetTeacher`) runs on batches of same-shape inputs under
``torch.inference_mode`` and the chosen precision, and its probabilities are mapped back to each image's grid
through the one inference core, `nakt.inference` (as `infer_probs` does for one case). Teachers that are not
networks nakt feeds (nnU-Net, predictions on disk) keep their own `Teacher.case_probs`.

Cases are processed in blocks of `batch_size` consecutive cases of the sorted case list; a block is the unit of
batching, of sharding (`nakt.sharding.Share.owns`) and of resuming, so every case is always computed in the same
batch and results are the same bytes however the work was split or interrupted. Memory stays bounded: only the
blocks in flight (the current one plus the loader's prefetch) are held.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from nakt.config import at_least, option
from nakt.errors import NaktError
from nakt.inference import (
    LAYOUTS,
    PRECISIONS,
    TTAS,
    compile_for_inference,
    net_probs,
    resolve_layout,
    resolve_precision,
    to_image_grid,
)
from nakt.io.dataset import Case
from nakt.io.images import Image, read_image
from nakt.models import ModelCard
from nakt.preprocess import prepare_image
from nakt.teachers import NetTeacher, Teacher, reading_orientation

__all__ = ["INFERENCE_CHECKS", "BackgroundWriter", "InferenceOptions", "LoadedCase", "block_probs", "blocks",
           "case_probs", "default_batch_size", "load_blocks"]


@dataclass(kw_only=True)
class InferenceOptions:
    """How the verbs that run models on many cases (label, predict, evaluate) batch them: `batch_size` cases per
    network batch (None: `default_batch_size`), `num_workers` loader processes decoding images, `precision`
    (`resolve_precision`), test-time augmentation `tta` (``none`` or ``flip``), the memory `layout`
    (`nakt.inference.resolve_layout`) and whether networks are compiled (`compile`)."""

    batch_size: int | None = option(None, "cases per network batch (default: 8 for 2D models, 1 for 3D); for "
                                    "label also the unit of parts and resume", group="performance")
    num_workers: int = option(0, "processes decoding and preparing images", group="performance")
    precision: str = option("auto", "network arithmetic: auto is bf16 on GPUs (fp16 before Ampere) and on CPUs "
                            "with AVX512-BF16 or AMX, else fp32", group="performance", choices=PRECISIONS)
    tta: str = option("none", "flip: mean of each image and its mirror", group="performance", choices=TTAS)
    layout: str = option("auto", "memory layout of 2D inputs and weights: auto is channels-last on GPUs and on "
                         "CPUs with AVX2 or better (nakt.machine), else contiguous", group="performance",
                         choices=LAYOUTS)
    compile: bool = option(False, "run the networks through torch.compile (Inductor, weights frozen): the first "
                           "batch of each shape compiles (its time is printed); pays only on long runs",
                           group="performance")


INFERENCE_CHECKS = {"batch_size": at_least(1), "num_workers": at_least(0)}


def default_batch_size(teachers: list[Teacher]) -> int:
    """8 cases per batch for 2D teachers; 1 when any teacher is 3D (a block of volumes and its K teachers'
    probabilities must fit in memory)."""
    return 1 if any(t.card.spatial_dims == 3 for t in teachers) else 8


def _prep_key(card: ModelCard) -> tuple:
    """What `prepare_image` reads of a card: teachers with equal keys share one prepared input."""
    return card.spatial_dims, card.in_channels, card.normalization, tuple(card.size or ())


@dataclass
class LoadedCase:
    """A case decoded once: its image and the prepared input ``[C_in, *grid]`` of each preprocessing key."""

    index: int
    case: Case
    image: Image
    prepared: dict[tuple, torch.Tensor]


def blocks(n_cases: int, batch_size: int) -> list[list[int]]:
    """Indices ``0..n-1`` in blocks of `batch_size` consecutive cases."""
    return [list(range(start, min(start + batch_size, n_cases))) for start in range(0, n_cases, batch_size)]


class _BlockDataset(torch.utils.data.Dataset):
    """Item j: block j of cases, read and prepared for every preprocessing key (in a loader worker)."""

    def __init__(self, cases: list[Case], chosen: list[list[int]], orientation: str, cards: list[ModelCard]):
        self.cases, self.chosen, self.orientation = cases, chosen, orientation
        self.cards = {_prep_key(c): c for c in cards}

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, j: int) -> list[LoadedCase] | NaktError:
        try:
            return [self._load(i) for i in self.chosen[j]]
        except NaktError as exc:  # handed back whole: the loader would rebuild it from its message alone
            return exc

    def _load(self, i: int) -> LoadedCase:
        case = self.cases[i]
        image = read_image(case.images, orientation=self.orientation)
        prepared = {key: prepare_image(image.array, card, case.images[0]) for key, card in self.cards.items()}
        return LoadedCase(i, case, image, prepared)


def _itself(item):
    return item


def load_blocks(cases: list[Case], chosen: list[list[int]], orientation: str, teachers: list[Teacher],
                num_workers: int = 0) -> Iterator[list[LoadedCase]]:
    """The `chosen` blocks of `cases`, in order, decoded and prepared by `num_workers` loader processes."""
    cards = [t.card for t in teachers if isinstance(t, NetTeacher)]
    loader = torch.utils.data.DataLoader(_BlockDataset(cases, chosen, orientation, cards), batch_size=None,
                                         collate_fn=_itself, num_workers=num_workers)
    for block in loader:
        if isinstance(block, NaktError):
            raise block
        yield block


def case_probs(teacher: Teacher, cases: list[Case], opts: InferenceOptions,
               device: torch.device) -> Iterator[tuple[LoadedCase, np.ndarray]]:
    """Each case, decoded, with one teacher's probabilities ``[C, *spatial]`` on its grid: the cases run in blocks
    of `opts.batch_size` (`default_batch_size`) at `opts.precision` on `device`, with `opts.tta`; `predict` and
    `evaluate` share this loop (`label` runs several teachers per block itself)."""
    precision = resolve_precision(opts.precision, device)
    chosen = blocks(len(cases), opts.batch_size or default_batch_size([teacher]))
    for block in load_blocks(cases, chosen, reading_orientation([teacher]), [teacher], opts.num_workers):
        yield from zip(block, block_probs(teacher, block, precision, opts.tta, opts.layout, opts.compile))


def block_probs(teacher: Teacher, block: list[LoadedCase], precision: str = "fp32", tta: str = "none",
                layout: str = "auto", compile: bool = False) -> list[np.ndarray]:
    """One teacher's probabilities ``[C, *spatial]`` for each case of a block, on each image's grid.

    Networks run on batches of same-shape prepared inputs, in the memory `layout` (`resolve_layout`), compiled
    on their first batch with `compile` (`nakt.inference.compile_for_inference`); other teachers case by case."""
    if not isinstance(teacher, NetTeacher):
        return [teacher.case_probs(item.case, item.image) for item in block]
    teacher.model.eval()
    channels_last = resolve_layout(layout, next(teacher.model.parameters()).device, teacher.card.spatial_dims)
    teacher.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)  # no-op after
    compiling = compile and teacher.compile_seconds is None
    key = _prep_key(teacher.card)
    out: list[np.ndarray | None] = [None] * len(block)
    for shape in dict.fromkeys(tuple(item.prepared[key].shape) for item in block):
        members = [k for k, item in enumerate(block) if tuple(item.prepared[key].shape) == shape]
        x = torch.stack([block[k].prepared[key] for k in members])
        if compiling:
            eager = net_probs(teacher.model, x, precision, tta, channels_last)  # what the graph must give
            compile_for_inference(teacher.model)
            teacher.compiled_shape = tuple(x.shape)
            start = time.perf_counter()
        elif (shape := teacher.compiled_shape) and x.shape[1:] == shape[1:] and len(x) < shape[0]:
            # a short last batch would compile a second graph (tens of seconds): pad it with its last input
            x = torch.cat([x, x[-1:].expand(shape[0] - len(x), *x.shape[1:])])
        probs = net_probs(teacher.model, x, precision, tta, channels_last)[:len(members)]
        if compiling:  # the compile time, amortised over the run: reported so a user can weigh it
            teacher.compile_seconds = time.perf_counter() - start
            print(f"nakt: compiled {teacher.spec} (first batch {teacher.compile_seconds:.1f} s)", file=sys.stderr)
            probs = _checked_compilation(teacher, eager, probs, precision)
            compiling = False
        for k, p in zip(members, probs):
            out[k] = to_image_grid(p, block[k].image.spatial_shape)
    return out


def _checked_compilation(teacher: NetTeacher, eager: torch.Tensor, compiled: torch.Tensor,
                         precision: str) -> torch.Tensor:
    """The first compiled batch against the eager one: a graph whose labels differ (under 99.9% agreement, or
    probabilities off by over 1e-3 in fp32) is dropped and the teacher runs eagerly from then on, with a line
    saying so. Inductor's CPU code has given wrong probabilities (with the ISA capped to AVX2, a monai:UNet off by
    0.77) where the eager network was right, so a compiled graph is trusted only once it has agreed."""
    agreement = float((eager.argmax(1) == compiled.argmax(1)).float().mean())
    worst = float((eager - compiled).abs().max())
    if agreement >= 0.999 and (precision != "fp32" or worst <= 1e-3):
        return compiled
    teacher.model.net._compiled_call_impl = None  # undoes nn.Module.compile: the eager forward again
    teacher.compiled_shape = None  # nor are its short batches padded: an eager network gains nothing from it
    print(f"nakt: --compile: {teacher.spec}'s compiled graph disagrees with the eager network on its first batch "
          f"(labels agree on {100 * agreement:.2f}% of pixels, max |p difference| {worst:.3g}): running it eagerly",
          file=sys.stderr)
    return eager


class BackgroundWriter:
    """Runs the per-case work after inference (fusion, encoding, writing) on one thread, so the networks never
    wait on disk. At most `depth` jobs are pending, which bounds memory; an error in a job is raised in the
    caller at its next `submit` or when the ``with`` block ends. Jobs run in submission order.

    >>> with BackgroundWriter() as writer:
    ...     writer.submit(print, "written")
    written
    """

    def __init__(self, depth: int = 2):
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nakt-writer")
        self._pending: deque[Future] = deque()

    def submit(self, fn: Callable, *args) -> None:
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            while self._pending:  # on an error too: jobs already submitted finish their (atomic) writes
                future = self._pending.popleft()
                if exc_type is None:
                    future.result()
                else:
                    future.exception()
        finally:
            self._pool.shutdown(wait=True)
