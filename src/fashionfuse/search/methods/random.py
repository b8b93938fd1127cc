"""`random` (the paper's method): `n_trials` seeded uniform draws in [low, high], on `step`."""

from __future__ import annotations

import numpy as np

from ...config import SearchConfig
from ..study import SearchContext, run_trials
from . import grid

# the search settings this method reads (beside the common ones): its fingerprint's part
SETTINGS = ("n_trials", "low", "high", "step")


def candidates(cfg: SearchConfig, names: list[str], seed: int) -> list[dict[str, float]]:
    """`n_trials` uniform draws in [low, high], rounded to `step` (and each searched operator
    hyper-parameter, density first, drawn from its values), reproducible from the seed: a
    fixed list, so a resumed search continues the same candidates."""
    rng = np.random.default_rng(seed)
    draws = rng.uniform(cfg.low, cfg.high, size=(cfg.n_trials, len(names)))
    if cfg.step:
        draws = np.clip(np.round(draws / cfg.step) * cfg.step, cfg.low, cfg.high)
    out = [dict(zip(names, (round(float(x), 6) for x in row))) for row in draws]
    for name, values in cfg.searched_params().items():
        picks = rng.integers(0, len(values), size=len(out))
        out = [{**c, name: values[int(k)]} for c, k in zip(out, picks)]
    return out


sampler = grid.sampler
distributions = grid.distributions


def run(ctx: SearchContext) -> None:
    run_trials(ctx, candidates=candidates(ctx.cfg.search, ctx.names, ctx.cfg.seed))
