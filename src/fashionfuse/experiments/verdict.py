"""The ablation's answer with its error bars: the comparisons the paper is about, each a paired
bootstrap over the same items (`evaluate.paired`), as lines a reader can quote.

    fused - best single: the searched fusion vs the best per-dataset adapter (by average)
    fused - all-data:    vs one adapter trained on every dataset (V0.2)
    fused - balanced mix: vs one adapter on equal token shares of each dataset
    fused - routing:     vs PEFT's Arrow routing over the same per-dataset adapters
    merge-ready fused - ...: adapters trained with one shared frozen A, fused by the same
                         search, against the standard fusion, all-data, balanced mix, best single
    <row> - base, retention: what each model kept of the base's general ability

A line says "cannot be told apart" when its 95 % interval holds 0; nothing else in the table
is a finding about these models.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..evaluate.paired import paired_difference, verdict_line

FUSED, ALL_DATA, BALANCED, SINGLE, ROUTING = ("V1 fusion, searched", "V0.2 ",
                                              "one adapter, balanced mix", "V0.1 ", "routing, ")
MERGE_READY = "fusion, merge-ready"


def _row(table: dict, prefix: str) -> str | None:
    return next((r["model"] for r in table["rows"] if r["model"].startswith(prefix)), None)


def load_items(eval_dir: Path, labels: list[str]) -> dict[str, dict]:
    """label -> its per-item values, from each model's results.json in an eval folder."""
    from ..evaluate.harness import results_folder

    out = {}
    for label in labels:
        path = eval_dir / results_folder(label) / "results.json"
        if path.is_file():
            out[label] = json.loads(path.read_text()).get("items") or {}
    return out


def verdicts(table: dict, items: dict[str, dict], specs: list, seed: int) -> list[dict]:
    """The paper's comparisons that the table has rows for: each {label, a, b, statistic,
    difference, low, high, items, line}."""
    fused = _row(table, FUSED)
    pairs = []
    if fused:
        singles = [r for r in table["rows"] if r["model"].startswith(SINGLE)]
        if singles:
            best = max(singles, key=lambda r: r["average"] or 0.0)["model"]
            pairs.append(("fused - best single", fused, best, "average"))
        for name, prefix in (("fused - all-data", ALL_DATA), ("fused - balanced mix", BALANCED),
                             ("fused - routing", ROUTING)):
            other = _row(table, prefix)
            if other:
                pairs.append((name, fused, other, "average"))
    ready = _row(table, MERGE_READY)
    if ready:  # adapters trained to be fused, against each way of using the same data
        singles = [r for r in table["rows"] if r["model"].startswith(SINGLE)]
        for name, other in (("merge-ready fused - standard fused", fused),
                            ("merge-ready fused - all-data", _row(table, ALL_DATA)),
                            ("merge-ready fused - balanced mix", _row(table, BALANCED)),
                            ("merge-ready fused - best single",
                             max(singles, key=lambda r: r["average"] or 0.0)["model"]
                             if singles else None)):
            if other:
                pairs.append((name, ready, other, "average"))
    if "retention" in table.get("summary", []) and any(r["model"] == "base" for r in table["rows"]):
        pairs += [(f"{r['model']} - base, retention", r["model"], "base", "retention")
                  for r in table["rows"] if r["model"] != "base"]
    out = []
    for label, a, b, statistic in pairs:
        if a not in items or b not in items:
            continue
        result = paired_difference(items[a], items[b], specs, statistic, seed=seed)
        out.append({"label": label, "a": a, "b": b, "statistic": statistic, **result,
                    "line": verdict_line(label, result)})
    return out


def shown_lines(lines: list[dict]) -> list[str]:
    """The verdict as read: every comparison of the paper; of the retention comparisons, those
    whose interval excludes 0, the rest in one line."""
    shown = [v["line"] for v in lines if v["statistic"] != "retention"]
    retention = [v for v in lines if v["statistic"] == "retention"]
    # a comparison with no items in common has no interval: its line says so
    shown += [v["line"] for v in retention
              if v["low"] is None or not v["low"] <= 0 <= v["high"]]
    same = [v for v in retention if v["low"] is not None and v["low"] <= 0 <= v["high"]]
    if same:
        shown.append(f"retention of the {len(same)} other rows cannot be told apart from the "
                     f"base's (differences {min(v['difference'] for v in same):+.2f} to "
                     f"{max(v['difference'] for v in same):+.2f} points)")
    return shown


def verdict_markdown(lines: list[dict]) -> str:
    """The verdict as a Markdown list (paper comparisons first, then retention)."""
    if not lines:
        return ""
    body = "\n".join(f"- {line}" for line in shown_lines(lines))
    return ("**Verdict** (difference in points, 95 % paired-bootstrap interval over the same "
            f"items):\n\n{body}\n\n")
