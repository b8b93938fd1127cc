"""Per-dataset statistics in the shape of the paper's Table 1."""

from __future__ import annotations

from .records import Record


class StatsAccumulator:
    """Table 1's statistics over a stream of records (`add` each, then `result`)."""

    def __init__(self) -> None:
        self.records = self.responses = self.words = 0

    def add(self, rec: Record) -> None:
        self.add_messages(rec.messages)

    def add_messages(self, messages: list[dict]) -> None:
        """Count one record given its messages."""
        responses = [m["content"] for m in messages if m["role"] == "assistant"]
        self.records += 1
        self.responses += len(responses)
        self.words += sum(len(r.split()) for r in responses)

    def result(self) -> dict:
        """Instances, average assistant turns and average response length in words."""
        n, r = self.records, self.responses
        return {"instances": n, "avg_turns": round(r / n, 2) if n else 0.0,
                "avg_response_words": round(self.words / r, 2) if r else 0.0}


def dataset_stats(records: list[Record]) -> dict:
    """Instances, average assistant turns and average response length in words (Table 1)."""
    acc = StatsAccumulator()
    for rec in records:
        acc.add(rec)
    return acc.result()


def table1_markdown(rows: dict[str, dict]) -> str:
    """Table 1 (dataset, type, instances, avg turns, avg response length) as Markdown."""
    lines = ["| Dataset | Type | Instances | Avg. Turns | Avg. Len. (words) |",
             "|---|---|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['kind']} | {row['instances']} | {row['avg_turns']} | "
                     f"{row['avg_response_words']} |")
    return "\n".join(lines) + "\n"
