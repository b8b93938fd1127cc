"""Side-by-side comparison table of evaluated models (rows) and task scores (columns)."""

from __future__ import annotations

import csv
import io

PREFERRED_METRICS = ("acc_norm,none", "acc,none", "mc2,none", "exact_match,none")


def headline_metric(task_results: dict) -> tuple[str, float] | None:
    """The task's headline metric (acc_norm, then acc, mc2, exact_match) and its value."""
    for key in PREFERRED_METRICS:
        if key in task_results and isinstance(task_results[key], (int, float)):
            return key.split(",")[0], float(task_results[key])
    return None


def build_table(results_by_model: dict[str, dict], tasks: list[str]) -> dict:
    """Rows of {model, task scores, average} plus the best model per column."""
    rows = []
    for model, results in results_by_model.items():
        row = {"model": model}
        for task in tasks:
            hm = headline_metric(results.get("results", {}).get(task, {}))
            row[task] = None if hm is None else round(hm[1] * 100, 2)
        vals = [row[t] for t in tasks if row[t] is not None]
        row["average"] = round(sum(vals) / len(vals), 2) if vals else None
        rows.append(row)
    columns = [*tasks, "average"]
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, rows = table["columns"], table["rows"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 3.2))
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(cols))]
        ax.bar(xs, [r[c] or 0 for c in cols], width=width, label=r["model"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))])
    ax.set_xticklabels(cols, rotation=15)
    ax.set_ylabel("score (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
