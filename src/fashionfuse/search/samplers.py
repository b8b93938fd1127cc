"""Search methods: where the next candidate weight vector comes from.

`grid` and `random` (the paper's methods) produce a fixed, seeded list of candidates, so a resumed
search continues the same list. `tpe` asks optuna's model-based sampler. To add a method, add a
function to `CANDIDATE_LISTS` (fixed lists) or `SAMPLERS` (adaptive optuna samplers).
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import optuna

from ..config import SearchConfig


def grid_candidates(cfg: SearchConfig, names: list[str], seed: int) -> list[dict[str, float]]:
    """Every combination of `grid_values` across the adapters."""
    return [dict(zip(names, combo)) for combo in itertools.product(cfg.grid_values, repeat=len(names))]


def random_candidates(cfg: SearchConfig, names: list[str], seed: int) -> list[dict[str, float]]:
    """`n_trials` uniform draws in [low, high], rounded to `step`, reproducible from the seed."""
    rng = np.random.default_rng(seed)
    draws = rng.uniform(cfg.low, cfg.high, size=(cfg.n_trials, len(names)))
    if cfg.step:
        draws = np.clip(np.round(draws / cfg.step) * cfg.step, cfg.low, cfg.high)
    return [dict(zip(names, (round(float(x), 6) for x in row))) for row in draws]


CANDIDATE_LISTS: dict[str, Callable[[SearchConfig, list[str], int], list[dict[str, float]]]] = {
    "grid": grid_candidates,
    "random": random_candidates,
}

SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True),
}


def distributions(cfg: SearchConfig, names: list[str]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The weight space optuna records for each adapter."""
    low = min(cfg.low, *cfg.grid_values)
    high = max(cfg.high, *cfg.grid_values)
    return {n: optuna.distributions.FloatDistribution(low, high) for n in names}
