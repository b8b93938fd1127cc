"""`dare` (DARE, Yu et al. 2023): drop and rescale, then the weighted sum.

Each task delta keeps every entry with probability p_keep = `density` and rescales the kept
ones by 1 / p_keep: dW_i' = m_i * dW_i / p_keep, m_i ~ Bernoulli(p_keep), then
dW = sum_i w_i dW_i'. The masks are drawn from one seed per adapter and module (derived from
the run's seed), so every candidate of a search sees the same masks and a rerun reproduces
them; the draws are computed where the delta lives and are the same on every device
(`seeded_uniform`).
"""

from __future__ import annotations

import torch

from .seeded_uniform import uniform


def drop_mask(shape: torch.Size, keep: float, seed: int, device=None) -> torch.Tensor:
    """The seeded Bernoulli(keep) mask of one task delta (True: kept), drawn on `device`."""
    return uniform(shape, seed, device) < keep


def merge(deltas: list[torch.Tensor], weights: list[float], *, density: float = 0.5,
          seeds: list[int] | None = None) -> torch.Tensor:
    """Drop-and-rescale each task delta with its seed, then take the weighted sum."""
    if seeds is None or len(seeds) != len(deltas):
        raise ValueError("dare needs one seed per task delta")
    out = torch.zeros_like(deltas[0])
    for w, d, seed in zip(weights, deltas, seeds):
        out += w * d * drop_mask(d.shape, density, seed, d.device) / density
    return out
