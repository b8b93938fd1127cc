"""Write the fused adapter of a candidate: exact for `sum` (the concatenated LoRA, each
module's block of B carrying its weight), by truncated SVD of the merged dense deltas for the
other operators (with the error report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ..lora import (
    SavedAdapter,
    check_fusable,
    fuse_adapters,
    save_peft_adapter,
    task_delta,
)
from . import delta_seed, operator
from .granularity import module_weight, module_weights
from .svd_export import svd_lora


def merged_deltas(adapters: list[SavedAdapter], names: list[str], weights: Mapping[str, float],
                  *, granularity: str, operator_name: str, density: float,
                  seed: int) -> dict[str, torch.Tensor]:
    """The operator's dense merge of every module's task deltas (float64, from the saved A/B;
    the same masks and weights the resident search used)."""
    out = {}
    for m in sorted(adapters[0].modules):
        deltas = [task_delta(a, m) for a in adapters]
        ws = [module_weight(weights, n, m, granularity) for n in names]
        seeds = [delta_seed(seed, n, m) for n in names]
        out[m] = operator(operator_name).merge(deltas, ws, density=density, seeds=seeds)
    return out


def write_fused(out: Path, adapters: list[SavedAdapter], names: list[str],
                weights: Mapping[str, float], *, granularity: str = "adapter",
                operator_name: str = "sum", density: float = 0.5, seed: int = 0,
                svd_rank: int | None = None) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Save the fused PEFT adapter in `out`; return its report and, for a dense operator, the
    exact merged deltas (what a merged-model export should add to the base)."""
    check_fusable(adapters)
    if operator_name == "sum":
        config, tensors = fuse_adapters(
            adapters, module_weights(weights, names, sorted(adapters[0].modules), granularity))
        save_peft_adapter(out, config, tensors)
        return {"operator": "sum", "exact": True, "rank": config["r"]}, None
    deltas = merged_deltas(adapters, names, weights, granularity=granularity,
                           operator_name=operator_name, density=density, seed=seed)
    rank = svd_rank or sum(a.config["r"] for a in adapters)
    tensors, report = svd_lora(deltas, rank)
    config = dict(adapters[0].config)
    config.update(r=rank, lora_alpha=rank, use_rslora=False, lora_dropout=0.0, inference_mode=True)
    save_peft_adapter(out, config, tensors)
    report = {"operator": operator_name, "density": density, "exact": False, **report}
    (out / "svd_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report, deltas
