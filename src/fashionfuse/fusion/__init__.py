"""Fusion operators on LoRA deltas, layer-wise weights, resident application and SVD export.

One file per operator (as mergekit has one per merge method); each defines `PARAMS` (its
hyper-parameters) and `merge(deltas, weights, *, density, seeds)` on the dense task deltas
dW_i = scale_i B_i A_i of one module:

    sum        task arithmetic, the paper's weighted sum (exact low-rank export)
    ties       trim by magnitude, elect sign, disjoint mean
    dare       seeded drop and rescale, then the weighted sum
    magnitude  magnitude pruning of each delta, then the weighted sum
"""

from __future__ import annotations

import hashlib
import importlib

OPERATORS = {
    "sum": "fashionfuse.fusion.task_arithmetic",
    "ties": "fashionfuse.fusion.ties",
    "dare": "fashionfuse.fusion.dare",
    "magnitude": "fashionfuse.fusion.magnitude",
}


def operator(name: str):
    """The module implementing fusion operator `name`."""
    return importlib.import_module(OPERATORS[name])


def delta_seed(seed: int, adapter: str, module: str) -> int:
    """The seed of one adapter's random mask on one module (DARE), derived from the run seed."""
    digest = hashlib.sha256(f"{seed}:{adapter}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
