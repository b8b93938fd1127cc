"""`magnitude`: magnitude pruning of each task delta, then the weighted sum.

Each dW_i keeps its k = round(density * numel) entries largest in magnitude (per adapter and
module) and zeroes the rest: TIES' trim step without sign election."""

from __future__ import annotations

import torch


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its k = max(1, round(density * numel)) largest-magnitude entries
    set to zero (entries tied with the k-th largest are kept too)."""
    if density >= 1.0:
        return delta.clone()
    flat = delta.abs().flatten()
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    k = max(1, round(density * flat.numel()))
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values.to(delta.dtype)
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def merge(deltas: list[torch.Tensor], weights: list[float], *, density: float = 0.5,
          seeds: list[int] | None = None) -> torch.Tensor:
    """The weighted sum of the magnitude-pruned task deltas (`seeds` unused)."""
    return sum(w * trim(d, density) for w, d in zip(weights, deltas))
