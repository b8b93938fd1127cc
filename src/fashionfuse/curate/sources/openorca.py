"""OpenOrca-style QA: `{"id", "system_prompt", "question", "response"}`."""

from __future__ import annotations

from ..records import Record
from ._fields import text_field


def to_record(row: dict, fallback_id: str, source: str) -> Record:
    """Normalise one OpenOrca row into a single-turn QA record."""
    question = text_field(row, "question")
    response = text_field(row, "response")
    system = text_field(row, "system_prompt", required=False) or None
    meta = {k: row[k] for k in ("model",) if isinstance(row.get(k), str)}
    return Record(id=str(row.get("id") or fallback_id), source=source, kind="qa", system=system,
                  messages=[{"role": "user", "content": question},
                            {"role": "assistant", "content": response}], meta=meta)
