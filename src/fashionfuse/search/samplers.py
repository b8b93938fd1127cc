"""Search methods: where the next candidate weight vector comes from.

`grid` and `random` (the paper's methods) produce a fixed, seeded list of candidates, so a resumed
search continues the same list. `tpe` asks optuna's model-based sampler. To add a method, add a
function to `CANDIDATE_LISTS` (fixed lists) or `SAMPLERS` (adaptive optuna samplers).
"""

from __future__ import annotations

import hashlib
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

def tpe_sampler(seed: int) -> optuna.samplers.BaseSampler:
    """optuna's TPE; `constant_liar` makes workers sharing a study avoid each other's running
    candidates (each worker must also have its own seed, see `worker_seed`)."""
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": tpe_sampler,
}


def worker_seed(seed: int, worker: str | None) -> int:
    """The sampler seed of one search worker: `seed` itself for a lone worker (`worker` None),
    a distinct seed derived from it for each named worker, so workers sharing a study do not
    propose the same points."""
    if worker is None:
        return seed
    digest = hashlib.sha256(f"{seed}:{worker}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def distributions(cfg: SearchConfig, names: list[str]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The weight space optuna records for each adapter. Sampler-driven methods (tpe) draw on the
    `step` lattice of [low, high]; fixed lists (grid) may hold any value in the space."""
    if cfg.method in SAMPLERS:
        step = cfg.step if cfg.step and _divides(cfg.high - cfg.low, cfg.step) else None
        return {n: optuna.distributions.FloatDistribution(cfg.low, cfg.high, step=step)
                for n in names}
    low = min(cfg.low, *cfg.grid_values)
    high = max(cfg.high, *cfg.grid_values)
    return {n: optuna.distributions.FloatDistribution(low, high) for n in names}


def _divides(span: float, step: float) -> bool:
    return abs(span / step - round(span / step)) < 1e-9
