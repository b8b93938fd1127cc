"""`ties` (TIES-merging, Yadav et al. 2023): trim, elect sign, disjoint mean.

For each module, with task deltas tau_i = w_i dW_i:
  1. trim: keep the k = round(density * numel) entries of tau_i largest in magnitude, zero the
     rest (per adapter and module);
  2. elect: gamma = sign(sum_i trimmed tau_i) per entry;
  3. disjoint mean: per entry, the mean of the trimmed tau_i whose sign equals gamma (entries
     where no tau_i agrees stay 0).
The weights scale the task vectors before trimming (all weights 1 is the paper's lambda = 1).
"""

from __future__ import annotations

import torch

from .magnitude import trim


def merge(deltas: list[torch.Tensor], weights: list[float], *, density: float = 0.5,
          seeds: list[int] | None = None) -> torch.Tensor:
    """TIES-merge the weighted task deltas of one module (`seeds` unused)."""
    return disjoint_mean(torch.stack([trim(w * d, density) for w, d in zip(weights, deltas)]))


def disjoint_mean(tau: torch.Tensor) -> torch.Tensor:
    """TIES' elect and disjoint mean over stacked task deltas [n, ...]: per entry, the sign of
    their sum, then the mean of the non-zero entries with that sign (0 where none agrees)."""
    elected = torch.sign(tau.sum(dim=0))
    agree = (torch.sign(tau) == elected) & (tau != 0)
    count = agree.sum(dim=0).clamp(min=1)
    return (tau * agree).sum(dim=0) / count
