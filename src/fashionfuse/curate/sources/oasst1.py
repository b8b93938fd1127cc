"""OpenAssistant oasst1: the tree export (one tree per line) or the flat message table.

Each row is `{"message_tree_id", "prompt": {message}}` where a message has `text`, `role`
("prompter" | "assistant"), `lang`, `rank`, `deleted`, `review_result` and nested `replies`.
The record follows the best-ranked reply at every level (lowest `rank`; unranked replies come
last), skipping deleted or review-rejected messages, so one tree gives one conversation thread.
"""

from __future__ import annotations

from typing import Iterator

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


def trees_from_messages(rows) -> "Iterator[tuple[str, dict | MalformedRow]]":
    """Rebuild tree-export rows from the flat message table (`message_id`, `parent_id`, ...).

    Messages are grouped under their root (the message without a parent); each tree is yielded
    where its root row was read. Messages whose parent never appears are reported as malformed.
    """
    by_id: dict[str, dict] = {}
    where_of: dict[str, str] = {}
    order: list[str] = []
    for where, row in rows:
        if isinstance(row, MalformedRow):
            yield where, row
            continue
        mid = row.get("message_id")
        if not isinstance(mid, str):
            yield where, MalformedRow("missing 'message_id'")
            continue
        by_id[mid] = dict(row, replies=[])
        where_of[mid] = where
        order.append(mid)
    roots = []
    for mid in order:
        msg = by_id[mid]
        parent = msg.get("parent_id")
        if parent is None:
            roots.append(mid)
        elif parent in by_id:
            by_id[parent]["replies"].append(msg)
        else:
            yield where_of[mid], MalformedRow(f"parent {parent!r} of message {mid!r} not found")
    for mid in roots:
        yield where_of[mid], {"message_tree_id": by_id[mid].get("message_tree_id", mid),
                              "prompt": by_id[mid]}
