"""Names of the search methods and objectives, and where each is implemented.

A method is a module with `sampler(search_cfg, seed)`, `distributions(search_cfg, names)` and
`run(ctx)` (see `methods/grid.py`); an objective is a class built from `(cfg, tokenizer,
device)` with `score(model, trial)` and `differentiable` (see `objectives.py`). Add one by
putting it in `BUILTIN_*` or, from another package, under the entry-point groups
`fashionfuse.search_methods` / `fashionfuse.search_objectives` (`name = "module:attr"` or a
module). This module imports nothing heavy, so config validation can check names against it.
"""

from __future__ import annotations

import importlib
from importlib import metadata

BUILTIN_METHODS = {
    "grid": "fashionfuse.search.methods.grid",
    "random": "fashionfuse.search.methods.random",
    "tpe": "fashionfuse.search.methods.tpe",
    "gp": "fashionfuse.search.methods.gp",
    "cmaes": "fashionfuse.search.methods.cmaes",
    "gradient": "fashionfuse.search.methods.gradient",
}
BUILTIN_OBJECTIVES = {
    "val_loss": "fashionfuse.search.objectives:ValLossObjective",
    "lm_eval": "fashionfuse.search.objectives:LmEvalObjective",
    "mix": "fashionfuse.search.objectives:MixObjective",
}


def _plugins(group: str) -> dict[str, str]:
    return {ep.name: ep.value for ep in metadata.entry_points(group=group)}


def method_names() -> list[str]:
    return list({**BUILTIN_METHODS, **_plugins("fashionfuse.search_methods")})


def objective_names() -> list[str]:
    return list({**BUILTIN_OBJECTIVES, **_plugins("fashionfuse.search_objectives")})


def _load(target: str):
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def search_method(name: str):
    """The module implementing search method `name`."""
    return _load({**BUILTIN_METHODS, **_plugins("fashionfuse.search_methods")}[name])


def objective_class(name: str):
    """The class implementing objective `name`."""
    return _load({**BUILTIN_OBJECTIVES, **_plugins("fashionfuse.search_objectives")}[name])
