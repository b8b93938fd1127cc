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
    trimmed = torch.stack([trim(w * d, density) for w, d in zip(weights, deltas)])
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agree.sum(dim=0).clamp(min=1)
    return (trimmed * agree).sum(dim=0) / count
