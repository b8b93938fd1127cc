"""Fusion operators on LoRA deltas, layer-wise weights, resident application and SVD export.

One file per operator (as mergekit has one per merge method), each with a merge function
`f(deltas, weights, *, density, seeds, **other hyper-parameters)` on the dense task deltas
dW_i = scale_i B_i A_i of one module, declared here as a `MergeOperator` (its hyper-parameters
and their defaults, whether it merges dense deltas); config validation reads these
declarations, and the search searches any hyper-parameter given a list of values:

    sum          task arithmetic, the paper's weighted sum (exact low-rank export)
    ties         trim by magnitude, elect sign, disjoint mean
    dare         seeded drop and rescale, then the weighted sum
    magnitude    magnitude pruning of each delta, then the weighted sum
    della        magnitude-ranked drop probabilities (epsilon), elect sign, disjoint mean
    breadcrumbs  drop both magnitude tails (the top share gamma), then the weighted sum
    knots_ties   KnOTS: SVD of the concatenated deltas into a shared basis, TIES there
    knots_dare   KnOTS with DARE-TIES in the shared basis
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class MergeOperator:
    """A fusion operator as the config and the search see it: its name, the module holding its
    `merge`, its hyper-parameters with their defaults, and whether it merges dense deltas
    (scored through forward hooks, exported by truncated SVD) rather than the exact low-rank
    sum."""

    name: str
    module: str
    params: dict[str, float] = field(default_factory=dict)
    dense: bool = True
    function: str = "merge"
    # a function of the module computing the weight-independent part of a merge from one
    # module's task deltas once (KnOTS' SVD); the merge then takes it as `prepared=`
    prepare: str | None = None

    def check(self, values: Mapping[str, float]) -> None:
        """Raise ValueError if these hyper-parameter values are outside the operator's domain
        (its module's `check_params`, where it has one)."""
        check = getattr(importlib.import_module(self.module), "check_params", None)
        if check is not None:
            check(**values)


OPERATORS = {op.name: op for op in (
    MergeOperator("sum", "fashionfuse.fusion.task_arithmetic", dense=False),
    MergeOperator("ties", "fashionfuse.fusion.ties", {"density": 0.5}),
    MergeOperator("dare", "fashionfuse.fusion.dare", {"density": 0.5}),
    MergeOperator("magnitude", "fashionfuse.fusion.magnitude", {"density": 0.5}),
    MergeOperator("della", "fashionfuse.fusion.della", {"density": 0.5, "epsilon": 0.1}),
    MergeOperator("breadcrumbs", "fashionfuse.fusion.breadcrumbs",
                  {"density": 0.5, "gamma": 0.01}),
    MergeOperator("knots_ties", "fashionfuse.fusion.knots", {"density": 0.5},
                  function="merge_ties", prepare="shared_basis"),
    MergeOperator("knots_dare", "fashionfuse.fusion.knots", {"density": 0.5},
                  function="merge_dare", prepare="shared_basis"),
)}
# hyper-parameter names beside density (a fusion weight may not be named like one)
OPERATOR_PARAMS = tuple(sorted({p for op in OPERATORS.values() for p in op.params} - {"density"}))
DENSE_OPERATORS = tuple(name for name, op in OPERATORS.items() if op.dense)


def searched_operator_params(best: dict) -> dict[str, float]:
    """A search's `best.json`: the hyper-parameters its dense operator was applied with
    (density, then the operator's others, as `best_<name>`), in declaration order."""
    declared = OPERATORS[best.get("operator", "sum")].params
    return {k: best[f"best_{k}"] for k in declared if f"best_{k}" in best}


def merge_function(name: str):
    """The merge function of fusion operator `name`."""
    op = OPERATORS[name]
    return getattr(importlib.import_module(op.module), op.function)


def prepare_function(name: str):
    """The weight-independent preparation of operator `name` (None when it has none)."""
    op = OPERATORS[name]
    return getattr(importlib.import_module(op.module), op.prepare) if op.prepare else None


def is_dense(name: str) -> bool:
    """Whether operator `name` merges dense deltas (not the exact low-rank sum)."""
    return OPERATORS[name].dense


def delta_seed(seed: int, adapter: str, module: str) -> int:
    """The seed of one adapter's random mask on one module (DARE), derived from the run seed."""
    digest = hashlib.sha256(f"{seed}:{adapter}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def merged_module_delta(task_deltas: list, names: list[str], module_key: str, weights,
                        *, granularity: str, operator_name: str, density: float, seed: int,
                        params: Mapping[str, float] | None = None, prepared=None):
    """One module's fused dense update: the operator's merge of its task deltas (one per
    adapter in `names`), each adapter weighted by w(adapter, module) at `granularity` and,
    for random operators, masked with the seed derived from the run seed, adapter and module;
    `params` sets the operator's other hyper-parameters (their defaults otherwise);
    `prepared`: the operator's `prepare` of these deltas, computed once by a caller that merges
    the same deltas for many candidates (the resident search). The resident search and the
    export both call this, so they merge identically."""
    from ..adapters.weight_keys import module_weight

    ws = [module_weight(weights, n, module_key, granularity) for n in names]
    seeds = [delta_seed(seed, n, module_key) for n in names]
    other = {k: float((params or {}).get(k, v)) for k, v in OPERATORS[operator_name].params.items()
             if k != "density"}
    if prepared is not None:
        other["prepared"] = prepared
    return merge_function(operator_name)(task_deltas, ws, density=density, seeds=seeds, **other)
