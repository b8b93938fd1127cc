"""Per-dataset statistics in the shape of the paper's Table 1."""

from __future__ import annotations

from .records import Record


def dataset_stats(records: list[Record]) -> dict:
    """Instances, average assistant turns and average response length in words (Table 1)."""
    n = len(records)
    responses = [r for rec in records for r in rec.responses]
    stats = {
        "instances": n,
        "avg_turns": round(sum(len(rec.responses) for rec in records) / n, 2) if n else 0.0,
        "avg_response_words": round(sum(len(r.split()) for r in responses) / len(responses), 2)
        if responses else 0.0,
    }
    return stats


def table1_markdown(rows: dict[str, dict]) -> str:
    """Table 1 (dataset, type, instances, avg turns, avg response length) as Markdown."""
    lines = ["| Dataset | Type | Instances | Avg. Turns | Avg. Len. (words) |",
             "|---|---|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['kind']} | {row['instances']} | {row['avg_turns']} | "
                     f"{row['avg_response_words']} |")
    return "\n".join(lines) + "\n"
