"""Fit conversations into the context window, and split datasets into train/validation."""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

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


def group_rank(gid: str, seed: int | str) -> int:
    """A conversation's place in the seeded order of `held_out_mask` (the first 64 bits of
    SHA-256 of "seed:gid": the order of the full hashes, ties aside)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{gid}".encode()).digest()[:8], "big")


def held_out_mask(ranks: np.ndarray, fraction: float) -> np.ndarray:
    """Which records are held out, given each record's conversation rank (equal ranks: the
    same conversation): whole conversations in ascending rank order until they hold
    `fraction` of the records (at least one record), always leaving one conversation in."""
    ranks = np.asarray(ranks, dtype=np.uint64)
    if len(ranks) == 0:
        return np.zeros(0, dtype=bool)
    groups, inverse, sizes = np.unique(ranks, return_inverse=True, return_counts=True)
    n_held = max(1, round(len(ranks) * fraction)) if len(groups) > 1 else 0
    taken_before = np.cumsum(sizes) - sizes
    k = min(int(np.count_nonzero(taken_before < n_held)) if n_held else 0, len(groups) - 1)
    return inverse.reshape(-1) < k


def record_group(rec: Record) -> str:
    """The conversation a record belongs to: its parent chat's id for a segment."""
    return rec.meta.get("parent", rec.id)


def train_validation_split(records: list[Record], fraction: float, seed: int | str
                           ) -> tuple[list[Record], list[Record]]:
    """Deterministic split by conversation: the conversations with the smallest seeded
    id-hashes go to validation until it holds `fraction` of the records. The segments of a
    chat split to fit the context (`meta.parent`) always land in the same split."""
    mask = held_out_mask([group_rank(record_group(r), seed) for r in records], fraction)
    return ([r for r, m in zip(records, mask) if not m], [r for r, m in zip(records, mask) if m])
