"""LoRA dropout with `torch.nn.Dropout`'s semantics and a cheaper mask draw.

PEFT applies `nn.Dropout(lora_dropout)` to the whole input of every LoRA layer, one mask per
layer. On CPU `bernoulli_` draws those masks slowly: in the profile of a 30M-parameter QLoRA
step (`scripts/bench_train.py --size 30m --profile 2`) it took 16 % of the step, a third of
what all the matmuls took. Drawing `rand < 1 - p` took about two thirds of that; a float per
element is still one generator call per element. Here each 64-bit draw gives four 16-bit
lanes, and an element is dropped when its lane falls under a threshold: four mask entries per
generator call. Lanes are compared at 15-bit resolution (the generator's fourth lane has 15
random bits; x86 and ARM are little-endian). On accelerators, whose float draws are fast,
the mask is `rand >= p_effective`. Either way the dropout probability used is p rounded to a
multiple of 2^-15 (`p_effective`: 0.05 -> 0.049988, 0.1 -> 0.100006); kept entries are scaled by
1 / (1 - p_effective), which keeps the output unbiased. The model trained is the same in
distribution up to that rounding; the random numbers differ from PEFT's, so a run is not
bit-identical to one with PEFT's own dropout.
"""

from __future__ import annotations

import torch

LANE_LEVELS = 2 ** 15  # mask resolution: the fourth 16-bit lane of an int64 draw has 15 bits


class UniformMaskDropout(torch.nn.Module):
    """Inverted dropout: in training each element is kept with probability 1 - p_effective and
    scaled by 1 / (1 - p_effective); identity in eval mode (as `torch.nn.Dropout`)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"dropout probability must be in (0, 1), got {p}")
        self.p = p
        self.dropped_levels = min(max(round(p * LANE_LEVELS), 1), LANE_LEVELS - 1)
        self.p_effective = self.dropped_levels / LANE_LEVELS
        self.keep_scale = 1.0 / (1.0 - self.p_effective)
        # int64 draws are uniform on [0, 2^63): as int16 lanes (little-endian), the three low
        # lanes are uniform on [-2^15, 2^15) and the top one on [0, 2^15)
        k = self.dropped_levels
        self._thresholds = torch.tensor([-LANE_LEVELS + 2 * k] * 3 + [k], dtype=torch.int16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masked, scale = self.mask(x)
        return masked if scale == 1.0 else masked * scale

    def mask(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The kept entries of `x` (others zeroed, not rescaled) and the rescaling still owed
        to them (1.0 in eval mode): a caller that applies a linear map next can rescale its
        smaller output instead (see adapters/forward.py)."""
        if not self.training:
            return x, 1.0
        return torch.where(self.keep_mask(x), x, x.new_zeros(())), self.keep_scale

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        """A fresh mask of the entries of `x` kept (bool, x's shape); training mode only."""
        if x.device.type == "cpu":
            n = x.numel()
            lanes = torch.empty((n + 3) // 4, dtype=torch.int64).random_().view(torch.int16)
            return (lanes.view(-1, 4) >= self._thresholds).view(-1)[:n].view(x.shape)
        # accelerators draw floats fast (and their integer draws are not checked here)
        return torch.rand_like(x) >= self.p_effective

    def extra_repr(self) -> str:
        return f"p={self.p}, p_effective={self.p_effective:.6f}"
