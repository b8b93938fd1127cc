"""Fusion weights finer than one per adapter: per adapter and transformer block (`layer`), or
per adapter, block and projection (`module`).

A candidate is a flat dict of named weights. At `adapter` granularity the names are the
adapters' (`chat`). At `layer` / `module` granularity each adapter has one weight per group,
named `<adapter>@<layer>` (`chat@3`) or `<adapter>@<layer>.<projection>` (`chat@3.q_proj`),
and the adapter's own name, when present, is a multiplier on all of its groups (what grid,
random and tpe search when they refine learned layer weights). A module path without a block
index (e.g. `lm_head`) is its own group, `<adapter>@-.<name>`.

The weight of adapter `a` on module `m` is therefore

    w(a, m) = weights.get(a, 1) * weights[a@group(m)]   (layer / module)
    w(a, m) = weights[a]                                (adapter)
"""

from __future__ import annotations

import re
from typing import Mapping

GRANULARITIES = ("adapter", "layer", "module")
_BLOCK = re.compile(r"\.(\d+)\.")


def block_index(module_key: str) -> int | None:
    """The transformer block a module path belongs to (its first numeric component)."""
    found = _BLOCK.search(module_key + ".")
    return int(found.group(1)) if found else None


def group_of(module_key: str, granularity: str) -> str | None:
    """The group `module_key` shares a weight with (None at `adapter` granularity)."""
    if granularity == "adapter":
        return None
    block = block_index(module_key)
    leaf = module_key.rsplit(".", 1)[-1]
    if block is None:
        return f"-.{leaf}"
    return str(block) if granularity == "layer" else f"{block}.{leaf}"


def weight_names(adapters: list[str], modules: list[str], granularity: str) -> list[str]:
    """Every weight a candidate of this granularity names, adapters in order, groups by block."""
    if granularity == "adapter":
        return list(adapters)
    groups = sorted({group_of(m, granularity) for m in modules}, key=_group_order)
    return [f"{a}@{g}" for a in adapters for g in groups]


def _group_order(group: str) -> tuple:
    block, _, leaf = group.partition(".")
    return (block == "-", int(block) if block.isdigit() else 0, leaf)


def module_weight(weights: Mapping[str, float], adapter: str, module_key: str,
                  granularity: str) -> float:
    """w(adapter, module) for a candidate (see the module docstring)."""
    if granularity == "adapter":
        return float(weights[adapter])
    group = f"{adapter}@{group_of(module_key, granularity)}"
    if group not in weights:
        raise KeyError(f"fusion weight {group!r} missing from the candidate")
    return float(weights.get(adapter, 1.0)) * float(weights[group])


def module_weights(weights: Mapping[str, float], adapters: list[str], modules: list[str],
                   granularity: str) -> list[dict[str, float]]:
    """Per adapter, the weight of every module: what the exact export and merges take."""
    return [{m: module_weight(weights, a, m, granularity) for m in modules} for a in adapters]


def granularity_of(weights: Mapping[str, float]) -> str:
    """`adapter` unless some weight is named `<adapter>@<group>`; then `layer` or `module`."""
    groups = [k.split("@", 1)[1] for k in weights if "@" in k]
    if not groups:
        return "adapter"
    return "module" if any("." in g and not g.startswith("-.") for g in groups) else "layer"


def neighbours(names: list[str]) -> list[tuple[str, str]]:
    """Pairs of weights of the same adapter (and projection) in consecutive blocks: the terms
    of the smoothness penalty sum (w[a@l+1] - w[a@l])^2."""
    index = {}
    for n in names:
        adapter, _, group = n.partition("@")
        block, _, leaf = group.partition(".")
        if block.isdigit():
            index[(adapter, int(block), leaf)] = n
    return [(n, index[(a, b + 1, leaf)]) for (a, b, leaf), n in index.items()
            if (a, b + 1, leaf) in index]
