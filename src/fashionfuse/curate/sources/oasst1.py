"""OpenAssistant oasst1 message trees (the official tree export, one tree per line).

Each row is `{"message_tree_id", "prompt": {message}}` where a message has `text`, `role`
("prompter" | "assistant"), `lang`, `rank`, `deleted`, `review_result` and nested `replies`.
The record follows the best-ranked reply at every level (lowest `rank`; unranked replies come
last), skipping deleted or review-rejected messages, so one tree gives one conversation thread.
"""

from __future__ import annotations

from ..records import MalformedRow, Record

ROLES = {"prompter": "user", "assistant": "assistant"}


def _usable(msg: dict) -> bool:
    return not msg.get("deleted") and msg.get("review_result", True) is not False


def _best_reply(msg: dict) -> dict | None:
    replies = [r for r in msg.get("replies") or [] if isinstance(r, dict) and _usable(r)]
    if not replies:
        return None
    return min(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0))


def to_record(row: dict, fallback_id: str, source: str) -> Record:
    """Normalise one oasst1 tree into its best-ranked thread."""
    msg = row.get("prompt")
    if not isinstance(msg, dict):
        raise MalformedRow("missing 'prompt' message of the tree")
    messages = []
    while msg is not None:
        role = ROLES.get(msg.get("role"))
        text = msg.get("text")
        if role is None or not isinstance(text, str):
            raise MalformedRow(f"message {msg.get('message_id')!r} lacks a known role or text")
        messages.append({"role": role, "content": text})
        msg = _best_reply(msg)
    prompt = row["prompt"]
    meta = {"lang": prompt.get("lang")} if isinstance(prompt.get("lang"), str) else {}
    return Record(id=str(row.get("message_tree_id") or fallback_id), source=source, kind="chat",
                  system=None, messages=messages, meta=meta)
