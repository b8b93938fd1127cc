"""`run_all(cfg)`: the four stages in order; each skips itself when its artifacts are current."""

from __future__ import annotations

from .config import RunConfig


def run_all(cfg: RunConfig, force: bool = False) -> dict:
    """Curate, train adapters, search fusion weights, evaluate (round by round with `rounds`)."""
    from .curate import curate
    from .evaluate import evaluate
    from .search import search_weights
    from .train import train_adapters

    if cfg.rounds:
        from .rounds import final_config, run_rounds

        return {"curate": curate(cfg, force=force), **run_rounds(cfg, force=force),
                "eval": evaluate(final_config(cfg), force=force)}
    return {
        "curate": curate(cfg, force=force),
        "train": train_adapters(cfg, force=force),
        "search": search_weights(cfg, force=force),
        "eval": evaluate(cfg, force=force),
    }
