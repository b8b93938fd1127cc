"""Seeded uniform draws that are the same numbers on every device and are computed on the
device that needs them: entry i of a draw is a hash of (seed, i) (splitmix64's mixing), not a
generator's stream. DARE's and DELLA's masks are drawn this way, so a search on a GPU and an
export on a CPU drop the same entries, and no mask is drawn on the host and copied over for
every candidate. Only integer additions, multiplications, shifts and xors: int64 arithmetic
wraps around as uint64 does, and the shifts are masked to act as logical ones."""

from __future__ import annotations

import torch

_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_M1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9
_M2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB


def _shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 values (as uint64)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def uniform(shape, seed: int, device=None) -> torch.Tensor:
    """float64 draws in [0, 1) of `shape`, entry i a function of (seed, i) only."""
    n = 1
    for d in shape:
        n *= int(d)
    z = torch.arange(n, dtype=torch.int64, device=device)
    z = z * _GOLDEN + ((int(seed) * 0x2545F491) & 0x7FFF_FFFF_FFFF_FFFF)
    z = (z ^ _shift_right(z, 30)) * _M1
    z = (z ^ _shift_right(z, 27)) * _M2
    z = z ^ _shift_right(z, 31)
    return (_shift_right(z, 11).to(torch.float64) * (1.0 / (1 << 53))).reshape(tuple(shape))
