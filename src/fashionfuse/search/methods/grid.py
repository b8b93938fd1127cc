"""`grid` (the paper's method): every combination of `grid_values` across the adapters."""

from __future__ import annotations

import itertools

import optuna

from ...config import SearchConfig
from ..study import SearchContext, run_trials

# the search settings this method reads (beside the common ones): its fingerprint's part
SETTINGS = ("grid_values", "low", "high")


def candidates(cfg: SearchConfig, names: list[str], seed: int) -> list[dict[str, float]]:
    """Every combination of `grid_values` across the adapters, times every combination of the
    operator's searched hyper-parameters (density, ...) when there are some (the seed is
    unused)."""
    combos = [dict(zip(names, c)) for c in itertools.product(cfg.grid_values, repeat=len(names))]
    searched = cfg.searched_params()
    if not searched:
        return combos
    return [{**c, **dict(zip(searched, values))}
            for values in itertools.product(*searched.values()) for c in combos]


def sampler(cfg: SearchConfig, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed)  # never asked: every candidate is enqueued


def distributions(cfg: SearchConfig, names: list[str]) -> dict:
    """A space holding every grid value (and [low, high])."""
    low, high = min(cfg.low, *cfg.grid_values), max(cfg.high, *cfg.grid_values)
    return {n: optuna.distributions.FloatDistribution(low, high) for n in names}


def run(ctx: SearchContext) -> None:
    run_trials(ctx, candidates=candidates(ctx.cfg.search, ctx.names, ctx.cfg.seed))
