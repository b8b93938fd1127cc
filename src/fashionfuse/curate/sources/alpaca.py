"""Alpaca / Open-Platypus style: `{"instruction", "input"?, "output" | "response"}`."""

from __future__ import annotations

from ..records import Record
from ._fields import text_field


def to_record(row: dict, fallback_id: str, source: str) -> Record:
    """Normalise one Alpaca row; a non-empty input is appended to the instruction."""
    instruction = text_field(row, "instruction")
    extra = text_field(row, "input", required=False)
    response = text_field(row, "output", "response")
    query = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Record(id=str(row.get("id") or fallback_id), source=source, kind="qa", system=None,
                  messages=[{"role": "user", "content": query},
                            {"role": "assistant", "content": response}], meta={})
