"""Hugging Face's conversational format (TRL, UltraChat, Tulu, OpenAI fine-tuning files):
`{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...], "system"?: ...}`.

A `content` may also be a list of parts (`[{"type": "text", "text": ...}]`, OpenAI's format):
the text parts are joined; any other part (an image, audio) makes the row malformed rather
than be silently dropped. Speaker names are read as ShareGPT's are (`human`/`gpt` too), so a
ShareGPT file written with `role`/`content` keys reads here as well.
"""

from __future__ import annotations

from ..records import MalformedRow, Record
from .sharegpt import ROLES


def _text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" \
                    and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise MalformedRow(f"{where}.content[{k}]: a {kind!r} part, not text")
        return "".join(texts)
    raise MalformedRow(f"{where}.content is {type(content).__name__}, expected a string")


def to_record(row: dict, fallback_id: str, source: str) -> Record:
    """Normalise one `messages` row; a leading system turn (or a `system` field) becomes the
    record's system message."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise MalformedRow("missing or empty 'messages' list")
    system = row.get("system") if isinstance(row.get("system"), str) else None
    messages = []
    for i, turn in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise MalformedRow(f"{where} is not an object")
        role = ROLES.get(str(turn.get("role", "")).lower())
        if role is None:
            raise MalformedRow(f"{where}: unknown role {turn.get('role')!r}")
        content = _text(turn.get("content"), where)
        if role == "system":
            if messages:
                raise MalformedRow(f"{where}: system turn after the conversation started")
            system = content
            continue
        messages.append({"role": role, "content": content})
    meta = {k: row[k] for k in ("model", "lang") if isinstance(row.get(k), str)}
    return Record(id=str(row.get("id") or fallback_id), source=source, kind="chat",
                  system=system or None, messages=messages, meta=meta)
