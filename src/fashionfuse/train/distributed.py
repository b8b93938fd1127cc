"""Data-parallel training under `torchrun` / `accelerate launch` (DDP: gloo on CPU, NCCL on GPU).

A single process is the world of size 1: every helper below is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the process group the launcher set up (WORLD_SIZE > 1), else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if size <= 1:
        return World(device="cuda" if cuda else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(),
                 device=f"cuda:{local}" if cuda else "cpu")


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
