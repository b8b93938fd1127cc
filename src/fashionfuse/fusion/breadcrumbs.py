"""`breadcrumbs` (Model Breadcrumbs, Davari & Belilovsky 2023): drop both tails, then the
weighted sum.

Each task delta dW_i of a module loses its largest-magnitude entries (the outliers, a share
`gamma` of its entries) and its smallest ones, so that a share `density` is kept:
with n entries ranked by magnitude, the kept ones are ranks [n - top - keep, n - top) for
top = round(gamma * n) and keep = round(density * n) (ties broken by position). Then
dW = sum_i w_i masked dW_i.
"""

from __future__ import annotations

import torch


def check_params(density: float, gamma: float) -> None:
    """The two tails must leave something: 0 <= gamma and density + gamma <= 1."""
    if not (gamma >= 0 and density > 0 and density + gamma <= 1):
        raise ValueError(f"breadcrumbs: density {density:g} + gamma {gamma:g} must be at most 1")


def crumbs(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """`delta` keeping only the entries between its `gamma` largest and its smallest tail."""
    check_params(density, gamma)
    n = delta.numel()
    top, keep = round(gamma * n), max(1, round(density * n))
    order = delta.abs().flatten().float().argsort(stable=True)  # ascending magnitude
    kept = torch.zeros(n, dtype=torch.bool, device=delta.device)
    kept[order[max(0, n - top - keep):n - top]] = True
    return torch.where(kept.view_as(delta), delta, torch.zeros_like(delta))


def merge(deltas: list[torch.Tensor], weights: list[float], *, density: float = 0.5,
          gamma: float = 0.01, seeds: list[int] | None = None) -> torch.Tensor:
    """The weighted sum of the tail-dropped task deltas (`seeds` unused)."""
    return sum(w * crumbs(d, density, gamma) for w, d in zip(weights, deltas))
