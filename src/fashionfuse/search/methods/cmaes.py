"""`cmaes`: optuna's CMA-ES sampler (covariance matrix adaptation, the evolution strategy
mergekit-evolve uses for merge weights): a population of candidates drawn from a Gaussian whose
mean and covariance follow the better ones. Like `gp`, it starts from the uniform point of the
range; `n_trials` is the budget (the `cmaes` package must be installed). A population
evolves a few generations per tens of trials, so it suits budgets of hundreds; for a handful of
weights and tens of trials `gp` is the better choice (`scripts/bench_search.py` measures both)."""

from __future__ import annotations

import optuna

from ...config import SearchConfig
from ...errors import UserError
from ..study import SearchContext
from . import gp, tpe

# the search settings this method reads (beside the common ones): its fingerprint's part
SETTINGS = ("n_trials", "low", "high", "step")


def sampler(cfg: SearchConfig, seed: int) -> optuna.samplers.BaseSampler:
    """CMA-ES (optuna's default step size, a sixth of the range); categorical parameters
    (searched operator hyper-parameters) fall back to optuna's independent sampler."""
    try:
        import cmaes  # noqa: F401  (optuna's CMA-ES runs on it)
    except ImportError:
        raise UserError("search.method cmaes needs the cmaes package (pip install cmaes)") from None
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


distributions = tpe.distributions


def run(ctx: SearchContext) -> None:
    gp.run(ctx)  # the uniform point first, then the sampler's proposals up to n_trials
