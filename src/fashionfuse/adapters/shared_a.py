"""Merge-ready adapters: one frozen, seeded down-projection A shared by every adapter of a run.

With `training.lora.shared_a`, each LoRA layer's A is drawn from the run's training seed and the
module's name alone (so every per-dataset adapter gets the same A on the same module, on any
machine), as PEFT draws A (Kaiming-uniform with a = sqrt(5)), and is frozen: only B trains.
Then sum_i w_i scale_i B_i A = (sum_i w_i scale_i B_i) A, and the fused adapter keeps rank r
(`saved.fuse_adapters` collapses adapters whose A is the same tensor on every module). The A
matrices' hash goes into each manifest, so adapters trained with another A are told apart.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .runtime import lora_layers


def _module_seed(seed: int, module: str) -> int:
    digest = hashlib.sha256(f"shared-a:{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def shared_down_projection(seed: int, module: str, rank: int, width: int) -> torch.Tensor:
    """The A [rank, width] of `module` for `seed`: Kaiming-uniform (a = sqrt(5)) as PEFT
    initialises A, from a generator seeded by the seed and the module's name (CPU, float32)."""
    gen = torch.Generator().manual_seed(_module_seed(seed, module))
    bound = 1.0 / math.sqrt(width)  # kaiming_uniform_(a=sqrt(5)) on a [rank, width] weight
    return (torch.rand(rank, width, generator=gen) * 2 - 1) * bound


def use_shared_a(model, seed: int, adapter: str = "default") -> str:
    """Set `adapter`'s A in every LoRA layer of `model` to the shared draw and freeze it;
    returns the hash of all of them (recorded in the manifest)."""
    digest = hashlib.sha256()
    for path, module in sorted(lora_layers(model).items()):
        if adapter not in module.lora_A:
            continue
        weight = module.lora_A[adapter].weight
        key = path.removeprefix("base_model.model.")
        a = shared_down_projection(seed, key, weight.shape[0], weight.shape[1])
        with torch.no_grad():
            weight.copy_(a.to(weight.dtype))
        weight.requires_grad_(False)
        digest.update(key.encode())
        digest.update(a.numpy().tobytes())
    return digest.hexdigest()[:16]


def shares_a(adapters) -> bool:
    """Whether saved adapters hold the very same A (and so the same rank) on every module."""
    first = adapters[0]
    return len(adapters) > 1 and all(
        a.modules == first.modules and all(torch.equal(a.lora_a[m], first.lora_a[m])
                                           for m in first.modules) for a in adapters[1:])
