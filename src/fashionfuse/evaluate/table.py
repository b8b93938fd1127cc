"""Side-by-side comparison table of evaluated models (rows) and task scores (columns)."""

from __future__ import annotations

import csv
import io

from ..lm_eval_run import headline_metric


def _mean(values: list) -> float | None:
    scored = [v for v in values if v is not None]
    return round(sum(scored) / len(scored), 2) if scored else None


def column_groups(specs: list) -> dict[str, list[str]]:
    """Group name -> its columns, when the specs fall into two groups or more (skill tasks and
    the retention preset, say; ungrouped columns form "other"); empty otherwise."""
    groups: dict[str, list[str]] = {}
    for s in specs:
        cols = groups.setdefault(s.group or "other", [])
        if s.column not in cols:
            cols.append(s.column)
    return groups if len(groups) > 1 else {}


def build_table(results_by_model: dict[str, dict], specs: list) -> dict:
    """Rows of {model, column scores, group means, average} plus the best model(s) per column.

    A column averages its tasks' metrics unweighted (so MMLU is the mean of subject accuracies);
    a spec without a metric uses the task's headline metric. When the columns fall into groups
    (`column_groups`: per-skill tasks and the retention preset), each group gets a column of
    its mean and `average` is the mean of the group means (skill and retention weigh the
    same); otherwise `average` is the mean of the columns.
    """
    columns: list[str] = []
    for s in specs:
        if s.column not in columns:
            columns.append(s.column)
    groups = column_groups(specs)
    rows = []
    for model, results in results_by_model.items():
        row = {"model": model}
        task_results = results.get("results", {})
        for col in columns:
            vals = []
            for s in (x for x in specs if x.column == col):
                res = task_results.get(s.task, {})
                if s.metric:
                    value = res.get(s.metric)
                else:
                    hm = headline_metric(res)
                    value = None if hm is None else hm[1]
                if isinstance(value, (int, float)):
                    vals.append(float(value))
            row[col] = round(100 * sum(vals) / len(vals), 2) if vals else None
        for group, cols in groups.items():
            row[group] = _mean([row[c] for c in cols])
        row["average"] = _mean([row[g] for g in groups] if groups else [row[c] for c in columns])
        rows.append(row)
    columns = [*columns, *groups, "average"]
    best = {}
    for c in columns:
        vals = [(r[c], r["model"]) for r in rows if r[c] is not None]
        if vals:
            top = max(v for v, _ in vals)
            best[c] = [m for v, m in vals if v == top]
    return {"columns": columns, "rows": rows, "best": best}


def to_markdown(table: dict) -> str:
    """Markdown with the best value per column in bold."""
    cols = table["columns"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in table["rows"]:
        cells = []
        for c in cols:
            v = r[c]
            text = "" if v is None else f"{v:.2f}"
            if v is not None and r["model"] in table["best"].get(c, []):
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", *table["columns"]])
    for r in table["rows"]:
        w.writerow([r["model"], *[r[c] for c in table["columns"]]])
    return buf.getvalue()


def plot_table(table: dict, path) -> None:
    """Grouped bar chart: one group per column, one bar per model."""
    from ..plots import pyplot, save_figure

    plt = pyplot()
    cols, rows = table["columns"], table["rows"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 4, 3.2))
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(cols))]
        ax.bar(xs, [r[c] or 0 for c in cols], width=width, label=r["model"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))])
    ax.set_xticklabels(cols, rotation=15)
    ax.set_ylabel("score (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not on, bars
    save_figure(fig, path)
