"""Side-by-side comparison table of evaluated models (rows) and task scores (columns)."""

from __future__ import annotations

import csv
import io

from .lm_eval_run import headline_metric


def _mean(values: list) -> float | None:
    scored = [v for v in values if v is not None]
    return round(sum(scored) / len(scored), 2) if scored else None


# each model's retention group mean minus the base's, in points (when both exist)
RETENTION_DELTA = "retention vs base"


def column_groups(specs: list) -> dict[str, list[str]]:
    """Group name -> its columns, when the specs fall into two groups or more (skill tasks and
    the retention preset, say); empty otherwise. Ungrouped columns (the user's own tasks) form
    "skill" beside a retention group alone, else "other"."""
    named = {s.group for s in specs if s.group}
    ungrouped = "skill" if named == {"retention"} else "other"
    groups: dict[str, list[str]] = {}
    for s in specs:
        cols = groups.setdefault(s.group or ungrouped, [])
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
    summary = [*groups, "average"]
    base = next((r for r in rows if r["model"] == "base"), None)
    if "retention" in groups and base is not None and base["retention"] is not None:
        for row in rows:  # what each model kept of the base's general ability
            kept = row["retention"]
            row[RETENTION_DELTA] = None if kept is None else round(kept - base["retention"], 2)
        summary.append(RETENTION_DELTA)
    columns = [*columns, *summary]
    return {"columns": columns, "rows": rows, "best": best_per_column(rows, columns),
            "summary": summary}


def standard_errors(table: dict, results_by_model: dict[str, dict], specs: list) -> dict:
    """Model -> column -> the standard error of that cell, in points, from the per-item values
    (`items`): a task's is sd / sqrt(n); a column, a group or `average`, being an unweighted mean
    of k parts, gets sqrt(sum of the parts' squared errors) / k (parts taken as independent).
    None where a part has fewer than two items. The paired intervals of the verdict
    (`paired.py`) are what to compare two rows by; these size one cell's noise."""
    import math

    groups = column_groups(specs)
    columns = [c for c in table["columns"] if c not in table["summary"]]

    def combined(parts: list) -> float | None:
        if not parts or any(p is None for p in parts):
            return None
        return math.sqrt(sum(p * p for p in parts)) / len(parts)

    out = {}
    for model, results in results_by_model.items():
        items = results.get("items") or {}
        task_se = {}
        for spec in specs:
            values = list((items.get(spec.task) or {}).values())
            n = len(values)
            if n >= 2:
                mean = sum(values) / n
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
                task_se[spec.task] = 100 * sd / math.sqrt(n)
        row = {c: combined([task_se.get(s.task) for s in specs if s.column == c]) for c in columns}
        for group, cols in groups.items():
            row[group] = combined([row[c] for c in cols])
        row["average"] = combined([row[g] for g in groups] if groups else [row[c] for c in columns])
        out[model] = {k: None if v is None else round(v, 2) for k, v in row.items()}
    return out


def stderr_markdown(table: dict) -> str:
    """The standard error of each cell of `table` (its `stderr`), in the table's layout."""
    errors = table.get("stderr") or {}
    cols = [c for c in table["columns"] if any(c in e for e in errors.values())]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for model, row in errors.items():
        lines.append(f"| {model} | " + " | ".join(
            "" if row.get(c) is None else f"{row[c]:.2f}" for c in cols) + " |")
    return ("Standard error of each cell, in points (sd / sqrt(items) per task; a mean of k "
            "parts: sqrt(sum of squares) / k):\n\n" + "\n".join(lines) + "\n")


def best_per_column(rows: list[dict], columns: list[str]) -> dict[str, list[str]]:
    """Column -> the model(s) with its highest value (ties all kept)."""
    best = {}
    for c in columns:
        vals = [(r[c], r["model"]) for r in rows if r[c] is not None]
        if vals:
            top = max(v for v, _ in vals)
            best[c] = [m for v, m in vals if v == top]
    return best


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
    """A models x columns heatmap: each cell's score written in it, coloured by its rank within
    its column (the column's best is brightest and bold, whatever the column's scale), models
    in the table's order, the group means and average set apart by a line."""
    import math

    from ..plots import pyplot, save_figure

    plt = pyplot()
    cols = table["columns"]
    rows = table["rows"]
    values = [[r[c] for c in cols] for r in rows]
    shade = [[math.nan] * len(cols) for _ in rows]
    for j in range(len(cols)):
        col = [v[j] for v in values if v[j] is not None]
        low, high = (min(col), max(col)) if col else (0.0, 0.0)
        for i, v in enumerate(values):
            if v[j] is not None:
                shade[i][j] = (v[j] - low) / (high - low) if high > low else 1.0
    fig, ax = plt.subplots(figsize=(max(4.0, 0.95 * len(cols) + 2.6), 0.38 * len(rows) + 1.3))
    ax.imshow(shade, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            v = values[i][j]
            text = "-" if v is None else f"{v:.1f}"
            dark = math.isnan(shade[i][j]) or shade[i][j] < 0.55
            best = v is not None and r["model"] in table["best"].get(c, [])
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if dark else "black", fontweight="bold" if best else "normal")
    ax.set_xticks(range(len(cols)), [c.removeprefix("local_") for c in cols], rotation=30,
                  ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [r["model"] for r in rows], fontsize=8)
    summary = table.get("summary", ["average"])
    first_summary = next((j for j, c in enumerate(cols) if c in summary), None)
    if first_summary:
        ax.axvline(first_summary - 0.5, color="white", linewidth=2)
    ax.set_title("score (%) per model and column; colour: rank within the column", fontsize=9)
    ax.tick_params(length=0)
    save_figure(fig, path)
