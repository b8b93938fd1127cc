"""Iterative fusion (paper Table 6): round k's fused adapter is merged into the base of round k+1.

Each round has its own run dir `<run_dir>/rounds/round-<k>/` (adapters, search, fused adapter)
and shares the parent's curated data (`curate/` is a link to the parent's). Round k's adapters
are trained, searched and evaluated on the base with the fused adapters of rounds 1..k-1 merged
in (`model.merge_adapters`), so they learn on top of what earlier rounds fused.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import RunConfig


def round_configs(cfg: RunConfig) -> list[RunConfig]:
    """The config of every round, its curated data linked to the parent run's."""
    out = []
    for k in range(len(cfg.rounds)):
        rcfg = cfg.round_config(k)
        root = Path(rcfg.run_dir)
        root.mkdir(parents=True, exist_ok=True)
        link = root / "curate"
        if not link.exists():
            os.symlink(os.path.relpath(Path(cfg.run_dir) / "curate", root), link)
        out.append(rcfg)
    return out


def run_rounds(cfg: RunConfig, stages: tuple[str, ...] = ("train", "search"),
               only: int | None = None, force: bool = False) -> dict:
    """Run the given stages of every round (or of round `only`, 1-based), in order."""
    from .search import search_weights
    from .train import train_adapters

    results = {}
    for k, rcfg in enumerate(round_configs(cfg), start=1):
        if only is not None and k != only:
            continue
        missing = [p for p in rcfg.model.merge_adapters if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"round {k}: fused adapter of an earlier round missing: "
                                    f"{missing[0]} (run the earlier rounds first)")
        print(f"round {k}/{len(cfg.rounds)}: adapters {rcfg.search_adapters}, "
              f"{len(rcfg.model.merge_adapters)} fused adapter(s) merged into the base")
        out = {}
        if "train" in stages:
            out["train"] = train_adapters(rcfg, rcfg.search_adapters, force=force)
        if "search" in stages:
            out["search"] = search_weights(rcfg, force=force)
        results[f"round-{k}"] = out
    return results


def final_config(cfg: RunConfig) -> RunConfig:
    """The config whose base and fused adapter make the final model (the last round's)."""
    return round_configs(cfg)[-1] if cfg.rounds else cfg
