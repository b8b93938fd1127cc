"""Paired comparisons of two scored models on the same items, with bootstrap intervals.

Every scored model keeps its per-item values (`item_values`: the value of the column's metric
on each document lm-eval scored, from its samples). Two rows of a table are compared on the
items both have: a paired bootstrap draws, within each task, the same documents with
replacement for both models, forms each model's score the way the table does (a column is the
unweighted mean of its tasks, a group the mean of its columns, `average` the mean of the groups
or of the columns), and takes the difference. The 2.5th and 97.5th percentiles of the draws
are the 95 % interval; the point estimate is the difference on all items. Seeded: the same
inputs give the same interval.
"""

from __future__ import annotations

import numpy as np

from .table import column_groups

BOOTSTRAP_DRAWS = 4000


def item_values(results: dict, specs: list) -> dict[str, dict[str, float]]:
    """task -> {doc_id: value of the task's table metric} from lm-eval's samples in `results`
    (tasks whose metric is not a number per item are left out)."""
    samples = results.get("samples") or {}
    out: dict[str, dict[str, float]] = {}
    for spec in specs:
        rows = samples.get(spec.task)
        if not rows:
            continue
        metric, _, filt = (spec.metric or _headline_key(results, spec.task)).partition(",")
        values = {}
        for row in rows:
            value = row.get(metric)
            if row.get("filter", "none") == (filt or "none") and isinstance(value, (int, float)):
                values[str(row["doc_id"])] = float(value)
        if values:
            out[spec.task] = values
    return out


def _headline_key(results: dict, task: str) -> str:
    from .lm_eval_run import PREFERRED_METRICS

    task_results = results.get("results", {}).get(task, {})
    return next((k for k in PREFERRED_METRICS if k in task_results), "acc,none")


def _score(task_means: dict[str, np.ndarray], specs: list, statistic: str) -> np.ndarray:
    """The table's `statistic` (a column, a group or `average`) from per-task means (points)."""
    columns: dict[str, list[str]] = {}
    for s in specs:
        columns.setdefault(s.column, [])
        if s.task in task_means and s.task not in columns[s.column]:
            columns[s.column].append(s.task)
    col_values = {c: np.mean([task_means[t] for t in ts], axis=0) for c, ts in columns.items() if ts}
    if statistic in col_values:
        return col_values[statistic]
    groups = column_groups(specs)
    group_values = {g: np.mean([col_values[c] for c in cs if c in col_values], axis=0)
                    for g, cs in groups.items() if any(c in col_values for c in cs)}
    if statistic in group_values:
        return group_values[statistic]
    if statistic != "average":
        raise KeyError(f"{statistic!r} is no column or group of the table")
    parts = list(group_values.values()) if groups else list(col_values.values())
    return np.mean(parts, axis=0)


def paired_difference(items_a: dict | list[dict], items_b: dict | list[dict], specs: list,
                      statistic: str = "average", draws: int = BOOTSTRAP_DRAWS,
                      seed: int = 0) -> dict:
    """Model a's `statistic` minus model b's, in points, on the items both have, with its 95 %
    paired-bootstrap interval: {difference, low, high, items, seeds, draws}.

    `items_a`/`items_b` are one model's per-item values, or a list of them, one per training
    seed (the same seeds, in the same order, for both): the difference is then the mean over
    seeds, and each draw resamples the seeds as well as the items (a two-level bootstrap), so
    the interval holds both the item and the seed variation."""
    runs_a = items_a if isinstance(items_a, list) else [items_a]
    runs_b = items_b if isinstance(items_b, list) else [items_b]
    if len(runs_a) != len(runs_b) or not runs_a:
        raise ValueError("both models need the same seeds")
    rng = np.random.default_rng(seed)
    tasks = set.intersection(*(set(r) for r in runs_a + runs_b))
    point = np.zeros(len(runs_a))
    per_seed = np.zeros((len(runs_a), draws))
    n_items = 0
    indices: dict[str, tuple[list[str], np.ndarray]] = {}
    for task in sorted(tasks):
        docs = sorted(set.intersection(*(set(r[task]) for r in runs_a + runs_b)))
        if docs:
            indices[task] = docs, rng.integers(0, len(docs), size=(draws, len(docs)))
            n_items += len(docs)
    if not n_items:
        return {"difference": None, "low": None, "high": None, "items": 0,
                "seeds": len(runs_a), "draws": draws}
    for k, (run_a, run_b) in enumerate(zip(runs_a, runs_b)):
        point_a, point_b, draws_a, draws_b = {}, {}, {}, {}
        for task, (docs, idx) in indices.items():
            a = np.array([run_a[task][d] for d in docs]) * 100
            b = np.array([run_b[task][d] for d in docs]) * 100
            point_a[task], point_b[task] = a.mean(), b.mean()
            draws_a[task], draws_b[task] = a[idx].mean(axis=1), b[idx].mean(axis=1)
        point[k] = _score(point_a, specs, statistic) - _score(point_b, specs, statistic)
        per_seed[k] = _score(draws_a, specs, statistic) - _score(draws_b, specs, statistic)
    if len(runs_a) > 1:
        seeds = rng.integers(0, len(runs_a), size=(draws, len(runs_a)))
        spread = per_seed[seeds, np.arange(draws)[:, None]].mean(axis=1)
    else:
        spread = per_seed[0]
    low, high = np.percentile(spread, [2.5, 97.5])
    return {"difference": float(point.mean()), "low": float(low), "high": float(high),
            "items": n_items, "seeds": len(runs_a), "draws": draws}


def verdict_line(label: str, result: dict) -> str:
    """"fused - all-data: -2.30 points (95 % CI -4.10 to -0.50)", or "... cannot be told
    apart" when the interval holds 0."""
    if result["difference"] is None:
        return f"{label}: no items in common"
    seeds = f", {result['seeds']} seeds" if result.get("seeds", 1) > 1 else ""
    text = (f"{label}: {result['difference']:+.2f} points (95 % CI {result['low']:+.2f} to "
            f"{result['high']:+.2f}, {result['items']} items{seeds})")
    return text + ("; cannot be told apart" if result["low"] <= 0 <= result["high"] else "")
