"""`sum` (task arithmetic, the paper's fusion): dW = sum_i w_i dW_i.

The one operator that keeps the low-rank form: its result is exported exactly as a
concatenated LoRA and searched by changing LoRA scales, not through dense deltas."""

from __future__ import annotations

import torch


def merge(deltas: list[torch.Tensor], weights: list[float], *, density: float = 1.0,
          seeds: list[int] | None = None) -> torch.Tensor:
    """The weighted sum of the task deltas (`density` and `seeds` are unused)."""
    return sum(w * d for w, d in zip(weights, deltas))
