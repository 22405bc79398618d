"""Splitting a verb's cases between processes: ``--num-parts P --part-id i`` (SLURM arrays, separate machines)
or torchrun (``RANK``/``WORLD_SIZE`` from the environment, a gloo process group for its barriers).

Every part works through a deterministic share of the same case list and writes into the same output folder;
shares are made of blocks of consecutive cases (`Share.owns`), so a batch of cases is the same whichever part
computes it and results do not depend on how the work was split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from nakt.errors import NaktError

__all__ = ["Share", "collective_device", "current_share", "on_first_part", "process_group"]


@dataclass(frozen=True)
class Share:
    """This process's part: `part` of `parts`; `distributed` under torchrun (barriers available)."""

    parts: int = 1
    part: int = 0
    distributed: bool = False
    local_rank: int = 0

    def owns(self, index: int, block: int = 1) -> bool:
        """True when case number `index` of the sorted list is this part's: blocks of `block` cases are dealt
        round-robin (block ``index // block`` goes to part ``block_number % parts``)."""
        return (index // block) % self.parts == self.part

    def device(self, device: torch.device) -> torch.device:
        """One GPU per torchrun process on a node (``cuda`` -> ``cuda:LOCAL_RANK``); other devices unchanged."""
        if self.distributed and device.type == "cuda" and device.index is None and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return device

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def current_share(num_parts: int = 1, part_id: int = 0) -> Share:
    """The share from ``--num-parts/--part-id``, or from torchrun's environment when ``WORLD_SIZE`` > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Share(num_parts, part_id)
    if num_parts != 1:
        raise NaktError(None, "--num-parts given under torchrun",
                        "torchrun's processes split the cases already (WORLD_SIZE); leave out --num-parts/--part-id")
    return Share(world, int(os.environ.get("RANK", "0")), True, int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def process_group(share: Share, backend: str = "gloo", device: torch.device | None = None) -> Iterator[None]:
    """A process group for torchrun's processes: gloo (CPU tensors: label's barriers, training on CPUs) or nccl
    (training on GPUs). With nccl this process's GPU (`device`, else ``cuda:LOCAL_RANK``) becomes the current
    device and the group's: NCCL's object collectives and barriers (`on_first_part`) use the current device, and
    every rank on cuda:0 fails with "Duplicate GPU detected"."""
    if not share.distributed or torch.distributed.is_initialized():
        yield
        return
    if backend == "nccl":
        if device is None or device.index is None:
            device = torch.device("cuda", share.local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend, device_id=device)
    else:
        torch.distributed.init_process_group(backend)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def on_first_part(share: Share, fn: Callable[[], None]) -> None:
    """Run `fn` on part 0 only, the others waiting for it; an error there is raised in every process (rather
    than leaving the others waiting at a barrier)."""
    if not share.distributed:
        fn()
        return
    problem: list = [None]
    if share.part == 0:
        try:
            fn()
        except NaktError as exc:
            problem = [(None if exc.path is None else str(exc.path), exc.problem, exc.hint)]
    torch.distributed.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise NaktError(*problem[0])


def collective_device() -> torch.device:
    """Where the tensors of collectives (``all_reduce``) must live in the current process group: this process's
    GPU under nccl (which takes no CPU tensors), else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
