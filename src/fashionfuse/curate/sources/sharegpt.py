"""ShareGPT-style chats: `{"id", "model"?, "conversations": [{"from", "value"}, ...]}`."""

from __future__ import annotations

from ..records import MalformedRow, Record

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


def to_record(row: dict, fallback_id: str, source: str) -> Record:
    """Normalise one ShareGPT row (system turn, if first, becomes the system message)."""
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise MalformedRow("missing or empty 'conversations' list")
    system = None
    messages = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise MalformedRow(f"conversations[{i}] is not an object")
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise MalformedRow(f"conversations[{i}]: unknown speaker {turn.get('from')!r}")
        value = turn.get("value")
        value = "" if value is None else value
        if not isinstance(value, str):
            raise MalformedRow(f"conversations[{i}].value is not a string")
        if role == "system":
            if i != 0:
                raise MalformedRow(f"conversations[{i}]: system turn after the first turn")
            system = value
            continue
        messages.append({"role": role, "content": value})
    meta = {k: row[k] for k in ("model", "lang") if isinstance(row.get(k), str)}
    return Record(id=str(row.get("id") or fallback_id), source=source, kind="chat",
                  system=system, messages=messages, meta=meta)



