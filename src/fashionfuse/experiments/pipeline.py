"""The stages and how they run: `run_stage(cfg, stage, round)` serves every CLI command, and
`run_all(cfg)` runs the four stages in order; each stage skips itself when its artifacts are
current.

Without `rounds` every stage works on the run dir. With rounds, curation is shared by all
rounds (parent run dir), train and search run per round (`--round N`), and eval scores the last
round's models.
"""

from __future__ import annotations

from typing import Literal

from ..config import RunConfig
from ..errors import UserError

Stage = Literal["curate", "train", "search", "eval"]


def stage_config(cfg: RunConfig, stage: Stage, round: int | None = None) -> RunConfig:
    """The config a stage runs with: the run's own, or the round's (see module doc)."""
    if not cfg.rounds:
        if round is not None:
            raise UserError("--round: the config has no `rounds`")
        return cfg
    from .rounds import prepare_round

    if stage == "curate":
        return cfg
    if stage == "eval":
        return prepare_round(cfg, len(cfg.rounds))
    if round is None:
        raise UserError(f"the config has rounds: pass --round N (1..{len(cfg.rounds)}), "
                         "or use `fashionfuse run` for every round")
    return prepare_round(cfg, round)


def run_stage(cfg: RunConfig, stage: Stage, round: int | None = None, force: bool = False,
              adapters: list[str] | None = None):
    """Run one stage (train: only `adapters` when given; a round trains its own adapters)."""
    scfg = stage_config(cfg, stage, round)
    if stage == "curate":
        from ..curate import curate
        from ..train.distributed import on_main_first

        return on_main_first(lambda again: curate(scfg, force=again), force)
    if stage == "train":
        from ..train import train_adapters

        names = adapters or (scfg.search_adapters if cfg.rounds else None)
        return train_adapters(scfg, names, force=force)
    if stage == "search":
        from ..search import search_weights

        return search_weights(scfg, force=force)
    from ..evaluate import evaluate

    return evaluate(scfg, force=force)


def run_all(cfg: RunConfig, force: bool = False) -> dict:
    """Curate, train adapters, search fusion weights, evaluate (round by round with `rounds`)."""
    out = {"curate": run_stage(cfg, "curate", force=force)}
    if not cfg.rounds:
        out.update({stage: run_stage(cfg, stage, force=force) for stage in ("train", "search")})
    for number in range(1, len(cfg.rounds) + 1):
        out[f"round-{number}"] = {stage: run_stage(cfg, stage, number, force=force)
                                  for stage in ("train", "search")}
    out["eval"] = run_stage(cfg, "eval", force=force)
    return out
