"""`della` (DELLA-Merging, Deep et al. 2024): magnitude-ranked drop, elect sign, disjoint mean.

For each module, with task deltas tau_i = w_i dW_i:
  1. MAGPRUNE: within each row of tau_i, entries are ranked by magnitude; an entry is kept
     with probability k = density - epsilon + 2 epsilon * rank / (n - 1) (rank 0 the smallest
     of its row's n entries, so the largest is kept with density + epsilon and the row keeps
     `density` of its entries on average) and a kept entry is rescaled by 1 / k, which keeps
     the expectation of every entry; the masks are seeded per adapter and module;
  2. elect: gamma = sign(sum_i pruned tau_i) per entry;
  3. fuse: per entry, the mean of the pruned tau_i whose sign equals gamma (TIES' disjoint
     mean; the paper's final scale lambda is the weights here).
`epsilon` must keep every keep probability inside (0, 1].
"""

from __future__ import annotations

import torch

from .seeded_uniform import uniform
from .ties import disjoint_mean


def check_params(density: float, epsilon: float) -> None:
    """Every keep probability must lie in (0, 1]: 0 <= epsilon < density <= 1 - epsilon."""
    if not (epsilon >= 0 and density - epsilon > 0 and density + epsilon <= 1):
        raise ValueError(f"della: density {density:g} +- epsilon {epsilon:g} must stay inside "
                         "(0, 1]")


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Each entry's keep probability: linear in its magnitude rank within its row, from
    density - epsilon (smallest) to density + epsilon (largest)."""
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.reshape(1, -1)
    n = rows.shape[1]
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float64)
    spread = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return (density - epsilon + 2 * epsilon * spread).reshape(delta.shape)


def magprune(delta: torch.Tensor, density: float, epsilon: float, seed: int) -> torch.Tensor:
    """`delta` with entries dropped by their magnitude-ranked probabilities (seeded) and the
    kept ones rescaled by 1 / their keep probability."""
    check_params(density, epsilon)
    keep = keep_probabilities(delta, density, epsilon)
    kept = uniform(delta.shape, seed, delta.device) < keep  # on the delta's device
    return torch.where(kept, delta / keep.to(delta.dtype), torch.zeros_like(delta))


def merge(deltas: list[torch.Tensor], weights: list[float], *, density: float = 0.5,
          epsilon: float = 0.1, seeds: list[int] | None = None) -> torch.Tensor:
    """DELLA-merge the weighted task deltas of one module with one seed per delta."""
    if seeds is None or len(seeds) != len(deltas):
        raise ValueError("della needs one seed per task delta")
    pruned = torch.stack([magprune(w * d, density, epsilon, s)
                          for w, d, s in zip(weights, deltas, seeds)])
    return disjoint_mean(pruned)
