"""LoRA dropout with `torch.nn.Dropout`'s semantics, drawn as the positions it drops.

PEFT applies `nn.Dropout(lora_dropout)` to the whole input of every LoRA layer, one mask per
layer: a random draw per element. On CPU those draws are slow (in a profile of SmolLM2's QLoRA
step the masks and the passes applying them took 15 % of the time) although at the usual
p = 0.05 nineteen in twenty elements are kept. Here the dropped positions are drawn directly:
in a row of independent Bernoulli(p) trials the gaps between one drop and the next are
independent geometric variables, so the flat indices of the dropped entries are the running
sum of geometric draws minus one, cut at the tensor's size. That is about p x n draws instead
of n, and the same distribution as `nn.Dropout`'s (p itself; kept entries scaled by
1 / (1 - p)). The LoRA layer uses the indices rather than a mask (adapters/peft_layers.py:
`MaskedLoraDelta`): A's input is a copy of `x` with those entries zeroed, made when needed and
not kept, and the indices are what the backward pass keeps (8 bytes per dropped entry: 0.4
bytes per element at p = 0.05, where a bool mask takes 1). The model trained is
`nn.Dropout`'s in distribution; the random numbers differ from PEFT's, so a run is not
bit-identical to one with PEFT's own dropout.
"""

from __future__ import annotations

import math

import torch

SPARE_SIGMAS = 8  # geometric draws beyond the expected count, in standard deviations


def dropped_positions(n: int, p: float, device=None, spare: float = SPARE_SIGMAS) -> torch.Tensor:
    """Sorted flat indices (int64) of the entries dropped from n, each independently with
    probability p: running sums of geometric(p) gaps, minus one, below n. `spare`: how many
    standard deviations of draws beyond the expected count to take in one go (more are drawn
    in the rare case those end before n)."""
    mean = n * p
    count = int(mean + spare * math.sqrt(mean * (1 - p))) + 16
    positions = _geometric(count, p, device).cumsum_(0)
    while int(positions[-1]) < n:
        more = _geometric(count, p, device).cumsum_(0)
        positions = torch.cat([positions, more.add_(positions[-1])])
    end = int(torch.searchsorted(positions, n, right=True))  # 1-based positions <= n
    return positions[:end].sub_(1)


def _geometric(count: int, p: float, device) -> torch.Tensor:
    """`count` draws of the number of Bernoulli(p) trials up to the first success (1, 2, ...),
    by inversion: ceil(log(1 - U) / log(1 - p)) for U uniform on [0, 1) in float64 (twice as
    fast as `geometric_` on CPU); the draw U = 0, of probability 2^-53, counts as 1."""
    u = torch.rand(count, dtype=torch.float64, device=device)
    gaps = u.neg_().log1p_().mul_(1.0 / math.log1p(-p)).ceil_().clamp_min_(1)
    return gaps.to(torch.int64)


def without_dropped(x: torch.Tensor, dropped: torch.Tensor, dtype=None) -> torch.Tensor:
    """A contiguous copy of `x` (in `dtype`, default x's) with the entries at flat row-major
    indices `dropped` zeroed."""
    copy = x.to(dtype or x.dtype, copy=True, memory_format=torch.contiguous_format)
    copy.view(-1).index_fill_(0, dropped, 0)
    return copy


class GapDropout(torch.nn.Module):
    """Inverted dropout: in training each element is dropped with probability p and the
    others scaled by 1 / (1 - p); identity in eval mode (as `torch.nn.Dropout`)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"dropout probability must be in (0, 1), got {p}")
        self.p = p
        self.keep_scale = 1.0 / (1.0 - p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masked, scale = self.mask(x)
        return masked if scale == 1.0 else masked * scale

    def mask(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """`x` with the dropped entries zeroed (not rescaled) and the rescaling still owed to
        the kept ones (1.0 in eval mode): a caller that applies a linear map next can rescale
        its smaller output instead."""
        if not self.training:
            return x, 1.0
        return without_dropped(x, self.dropped(x)), self.keep_scale

    def dropped(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh flat indices (into `x` in row-major order) of the entries dropped; training
        mode only."""
        return dropped_positions(x.numel(), self.p, x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}"
