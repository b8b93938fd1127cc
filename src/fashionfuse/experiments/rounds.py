"""Iterative fusion (paper Table 6): round k's fused adapter is merged into the base of round k+1.

Each round has its own run dir `<run_dir>/rounds/round-<k>/` (adapters, search, fused adapter)
and shares the parent's curated data (`curate/` is a link to the parent's). Round k's adapters
are trained, searched and evaluated on the base with the fused adapters of rounds 1..k-1 merged
in (`model.merge_adapters`), so they learn on top of what earlier rounds fused.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..errors import MissingFileError, UserError
from ..rundir import link_shared


def prepare_round(cfg: RunConfig, number: int) -> RunConfig:
    """The config of round `number` (1-based), its run dir created with `curate/` linked to the
    parent run's, and the earlier rounds' fused adapters checked to exist."""
    if not 1 <= number <= len(cfg.rounds):
        raise UserError(f"--round: {number} is not a round of this config (1..{len(cfg.rounds)})")
    rcfg = cfg.round_config(number - 1)
    link_shared(cfg.run_dir, rcfg.run_dir, ("curate",))
    missing = [p for p in rcfg.model.merge_adapters if not Path(p).exists()]
    if missing:
        raise MissingFileError(f"round {number}: fused adapter of an earlier round missing: "
                                f"{missing[0]} (run the earlier rounds first)")
    print(f"round {number}/{len(cfg.rounds)}: adapters {rcfg.search_adapters}, "
          f"{len(rcfg.model.merge_adapters)} fused adapter(s) merged into the base")
    return rcfg
