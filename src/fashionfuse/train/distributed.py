"""Data-parallel training under `torchrun` / `accelerate launch` (DDP: gloo on CPU, NCCL on GPU).

A single process is the world of size 1: every helper below is then a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from ..devices import process_placement

TIMEOUT_MIN = 120  # the process group's collective timeout (torch's default: 10 min for NCCL)
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the process group the launcher set up (WORLD_SIZE > 1), else a world of one. Each
    process computes on its own GPU with NCCL, or on the CPU with gloo where CUDA is not visible
    or `FASHIONFUSE_DIST_BACKEND=gloo` says so (`devices.placement`)."""
    where = process_placement()
    if where.backend is None:
        return World(device=where.device)
    if where.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(where.device))
    if not dist.is_initialized():
        # long enough for rank 0 to curate or write while the others wait at a barrier
        dist.init_process_group(where.backend, timeout=timedelta(minutes=TIMEOUT_MIN))
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=where.device)


def leave_world() -> None:
    """Destroy the process group, if one was joined (by us or by accelerate under lm-eval):
    left to interpreter shutdown, gloo's threads can abort a process that finished its work
    ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(world: World, values: list[float]) -> list[float]:
    """Sum a few numbers over every process."""
    if world.size == 1:
        return values
    t = reduction_tensor(world, values)
    dist.all_reduce(t)
    return t.tolist()


def reduction_tensor(world: World, values: list[float]) -> torch.Tensor:
    """`values` as a tensor on the process's own device: an NCCL group (GPU) cannot reduce CPU
    tensors, a gloo group (CPU) can only reduce CPU ones."""
    return torch.tensor(values, dtype=torch.float64, device=world.device)


def gather(world: World, obj):
    """Every process's `obj`, in rank order (on every rank)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def wrap(world: World, model):
    """DDP around the trainable model (only LoRA parameters need gradients)."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(world.device).index] if world.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def on_main_first(work: Callable[[bool], T], force: bool = False) -> T:
    """`work(force)` on rank 0 while the other processes wait; then `work(False)` on the others,
    which find its artifacts up to date and only read them: one process writes a stage's
    shared artifacts (curation, under `torchrun ... run` or `ablate`), none races on them. A
    world of one: `work(force)`."""
    world = init_world()
    if world.size == 1:
        return work(force)
    result = work(force) if world.is_main else None
    barrier(world)
    return result if world.is_main else work(False)


def is_main_process() -> bool:
    """Rank 0 of a launched job, or a process on its own (no process group needed)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0
