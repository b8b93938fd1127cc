"""`mixed_searched`, the ablation's tuned data mix: the mixing ratios searched with the same
objective and candidate set as the fusion weights, so mixing gets the tuning effort fusion gets.

Candidates: every point of the fusion grid (`search.grid_values` per searched dataset),
normalised to token shares, without the all-zero point and without repeats (1, 1 and 0.5, 0.5
are one mix). Each candidate is one adapter trained on all the searched datasets with those
shares (`adapters[].mix`; named `ablate-mix-search-<k>`, trained and cached like every
adapter, so an interrupted search resumes at the first untrained candidate), scored alone on
the base by `search.objective` (the same validation splits or tasks the fusion search scores).
The lowest score wins. `ablate/mix-search/trials.json` holds every candidate's shares and
scores, `best.json` the winner; its adapter is the table's row.
"""

from __future__ import annotations

import itertools

from .config import RunConfig
from .rundir import RunLayout, write_json

PREFIX = "ablate-mix-search-"


def mix_candidates(cfg: RunConfig) -> list[dict[str, float]]:
    """The distinct token-share vectors of the fusion grid over the searched adapters'
    datasets, normalised (shares rounded to 6 places), in grid order."""
    datasets = [cfg.adapter_spec(a).datasets[0] for a in cfg.search_adapters]
    out, seen = [], set()
    for point in itertools.product(cfg.search.grid_values, repeat=len(datasets)):
        total = sum(max(0.0, v) for v in point)
        if total <= 0:
            continue
        shares = tuple(round(max(0.0, v) / total, 6) for v in point)
        if shares not in seen:
            seen.add(shares)
            out.append(dict(zip(datasets, shares)))
    return out


def candidate_specs(cfg: RunConfig) -> list[dict]:
    """The candidates as adapter specs (for `ablation_config`): every dataset of the run,
    those not searched with share 0."""
    names = [d.name for d in cfg.datasets]
    return [{"name": f"{PREFIX}{k}", "datasets": names,
             "mix": {d: shares.get(d, 0.0) for d in names}}
            for k, shares in enumerate(mix_candidates(cfg))]


def shares_label(shares: dict[str, float]) -> str:
    """A mix's token shares as a table label reads them: `chat 0.20, orca 0.40, ...`."""
    return ", ".join(f"{d} {v:.2f}" for d, v in shares.items())


def search_mix(cfg: RunConfig, acfg: RunConfig, force: bool = False) -> tuple[str, str]:
    """Train and score every candidate mix (`acfg`: the ablation config holding their specs);
    the winner's table label and adapter name."""
    import torch

    from .adapters.runtime import attach_adapters, set_fusion_weights
    from .base_model import default_device, load_base_model, load_tokenizer
    from .search.objectives import build_objective
    from .train import train_adapters

    specs = candidate_specs(cfg)
    names = [s["name"] for s in specs]
    train_adapters(acfg, names, force=force)
    layout = RunLayout(cfg.run_dir)
    device = default_device()
    tokenizer = load_tokenizer(cfg.model)
    model = attach_adapters(load_base_model(cfg.model, device=device),
                            {n: layout.adapter(n) for n in names})
    objective = build_objective(cfg, tokenizer, device)
    trials = []
    with torch.no_grad():
        for spec in specs:
            set_fusion_weights(model, {n: float(n == spec["name"]) for n in names})
            scored = objective.score(model)
            trials.append({"adapter": spec["name"], "mix": spec["mix"], "score": scored["score"],
                           "per_dataset": scored["per_dataset"]})
            print(f"mix search: {spec['mix']} -> {scored['score']:.4f}", flush=True)
    best = min(trials, key=lambda t: t["score"])
    out = layout.ablation("mix-search")
    write_json(out / "trials.json", trials)
    write_json(out / "best.json", {"objective": cfg.search.objective.type,
                                   "n_candidates": len(trials), **best})
    return f"one adapter, mix searched ({shares_label(best['mix'])})", best["adapter"]
