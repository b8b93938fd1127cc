"""`tpe`: optuna's model-based sampler proposes each candidate from the finished ones."""

from __future__ import annotations

import optuna

from ...config import SearchConfig
from ..study import SearchContext, run_trials

# the search settings this method reads (beside the common ones): its fingerprint's part
SETTINGS = ("n_trials", "low", "high", "step")


def sampler(cfg: SearchConfig, seed: int) -> optuna.samplers.BaseSampler:
    """TPE; `constant_liar` makes workers sharing a study avoid each other's running candidates
    (each worker also has its own seed, see `study.worker_seed`)."""
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def distributions(cfg: SearchConfig, names: list[str]) -> dict:
    """[low, high] on the `step` lattice (the config checks that step divides the range)."""
    return {n: optuna.distributions.FloatDistribution(cfg.low, cfg.high, step=cfg.step)
            for n in names}


def run(ctx: SearchContext) -> None:
    run_trials(ctx, budget=ctx.cfg.search.n_trials)
