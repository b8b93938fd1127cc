"""`ablate.seeds`: the same ablation once per training seed, and the tables combined.

Each seed is a run of its own (`training.seed` set) that shares the run's curated splits, so
the eval scores the same items for every seed: the run's own training seed is the run itself,
the others live in `ablate/seed-<s>/`. The combined table holds, per row and column, the mean
over seeds, with the spread (sample standard deviation) of each summary column beside it.
"""

from __future__ import annotations

import statistics

from ..config import RunConfig
from ..errors import UserError
from ..evaluate.table import best_per_column
from ..rundir import RunLayout, link_shared


def seed_configs(cfg: RunConfig) -> list[RunConfig]:
    """One config per `ablate.seeds` entry (the run's own config for its own training seed);
    [cfg] when no seeds are set."""
    if not cfg.ablate.seeds:
        return [cfg]
    own = cfg.training_seed
    out = []
    for seed in cfg.ablate.seeds:
        if seed == own:
            out.append(cfg)
            continue
        run_dir = link_shared(cfg.run_dir, RunLayout(cfg.run_dir).ablation(f"seed-{seed}"),
                              ("curate",))
        out.append(cfg.model_copy(update={
            "run_dir": str(run_dir),
            "training": cfg.training.model_copy(update={"seed": seed}),
            "ablate": cfg.ablate.model_copy(update={"seeds": []})}))
    return out


def combine_tables(tables: list[dict], seeds: list[int]) -> dict:
    """The mean of the seeds' tables (rows in the first table's order and labels), with
    `<column> sd` beside each summary column, the seeds, and each seed's own table."""
    first = tables[0]
    if any(len(t["rows"]) != len(first["rows"]) for t in tables):
        raise UserError("ablate.seeds: the seeds built different variants; rerun with --force")
    rows = []
    for k, row in enumerate(first["rows"]):
        labels = {t["rows"][k]["model"] for t in tables}  # a label may carry a seed's weights
        out = {"model": row["model"] if len(labels) == 1 else
               row["model"].split(" (")[0] + " (weights searched per seed)"}
        for col in first["columns"]:
            values = [t["rows"][k][col] for t in tables if t["rows"][k][col] is not None]
            out[col] = round(statistics.fmean(values), 2) if values else None
            if col in first.get("summary", []):
                out[f"{col} sd"] = round(statistics.stdev(values), 2) if len(values) > 1 else None
        rows.append(out)
    columns = []
    for col in first["columns"]:
        columns.append(col)
        if col in first.get("summary", []):
            columns.append(f"{col} sd")
    return {"columns": columns, "rows": rows, "best": best_per_column(rows, first["columns"]),
            "summary": first.get("summary", []), "seeds": seeds, "per_seed": tables}
