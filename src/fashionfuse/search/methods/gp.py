"""`gp`: optuna's Gaussian-process sampler (Bayesian optimisation), suited to a few continuous
weights; the first candidate is the uniform point, so the search starts from the fusion the
paper's grid would try first in the middle of the range."""

from __future__ import annotations

import optuna

from ...config import SearchConfig
from ..study import SearchContext, finished, run_trials
from . import tpe

# the search settings this method reads (beside the common ones): its fingerprint's part
SETTINGS = ("n_trials", "gp_startup_trials", "low", "high", "step")


def sampler(cfg: SearchConfig, seed: int) -> optuna.samplers.BaseSampler:
    """GP-based Bayesian optimisation; the validation loss of a candidate is deterministic."""
    return optuna.samplers.GPSampler(seed=seed, deterministic_objective=True,
                                     n_startup_trials=cfg.gp_startup_trials)


distributions = tpe.distributions


def start_point(cfg: SearchConfig, names: list[str]) -> dict[str, float]:
    """The uniform point of the range, on the `step` lattice."""
    mid = (cfg.low + cfg.high) / 2
    if cfg.step:
        mid = cfg.low + round((mid - cfg.low) / cfg.step) * cfg.step
    return {n: round(mid, 6) for n in names}


def run(ctx: SearchContext) -> None:
    if not finished(ctx.study, pruned=True) and not ctx.study.get_trials(deepcopy=False):
        ctx.study.enqueue_trial({**start_point(ctx.cfg.search, ctx.weight_names),
                                 **{k: v[0] for k, v in ctx.cfg.search.searched_params().items()}})
    run_trials(ctx, budget=ctx.cfg.search.n_trials)
