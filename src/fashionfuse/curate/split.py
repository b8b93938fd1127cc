"""Fit conversations into the context window, and split datasets into train/validation."""

from __future__ import annotations

import hashlib
from typing import Callable

from .records import Record, Rejection


def split_to_fit(rec: Record, count_tokens: Callable[[list[dict], str | None], int],
                 max_tokens: int) -> list[Record] | Rejection:
    """Split a chat at turn boundaries into segments of whole user/assistant pairs that fit.

    A pair is never cut in half: a single pair longer than `max_tokens` rejects the record.
    """
    pairs = [rec.messages[i:i + 2] for i in range(0, len(rec.messages), 2)]
    segments: list[list[dict]] = []
    current: list[dict] = []
    for pair in pairs:
        if count_tokens(pair, rec.system) > max_tokens:
            return Rejection(rec.id, "too_long",
                             f"one user/assistant pair exceeds max_input_len={max_tokens} tokens")
        if current and count_tokens(current + pair, rec.system) > max_tokens:
            segments.append(current)
            current = []
        current = current + pair
    segments.append(current)
    if len(segments) == 1:
        return [rec]
    return [Record(id=f"{rec.id}#{k}", source=rec.source, kind=rec.kind, system=rec.system,
                   messages=seg, meta=dict(rec.meta, segment=k, parent=rec.id))
            for k, seg in enumerate(segments)]


def train_validation_split(records: list[Record], fraction: float, seed: int | str
                           ) -> tuple[list[Record], list[Record]]:
    """Deterministic split by conversation: the conversations with the smallest seeded
    id-hashes go to validation until it holds `fraction` of the records. The segments of a
    chat split to fit the context (`meta.parent`) always land in the same split."""
    def group(rec: Record) -> str:
        return rec.meta.get("parent", rec.id)

    def rank(gid: str) -> str:
        return hashlib.sha256(f"{seed}:{gid}".encode()).hexdigest()

    sizes: dict[str, int] = {}
    for r in records:
        sizes[group(r)] = sizes.get(group(r), 0) + 1
    n_val = max(1, round(len(records) * fraction)) if len(sizes) > 1 else 0
    val_groups: set[str] = set()
    taken = 0
    for gid in sorted(sizes, key=rank):
        if taken >= n_val or len(val_groups) == len(sizes) - 1:  # train keeps at least one
            break
        val_groups.add(gid)
        taken += sizes[gid]
    return ([r for r in records if group(r) not in val_groups],
            [r for r in records if group(r) in val_groups])
