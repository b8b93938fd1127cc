"""Exact and near-duplicate removal over a stream of records, in memory flat in the row count.

Per record only fixed-size state stays in memory: a 64-bit key of the conversation's SHA-1
(exact duplicates) and one 64-bit key per LSH band of its MinHash signature (near duplicates),
both in `minhash.KeyIndex` (12 bytes a key), plus the record's 8-byte offset in a spill file on
disk. Candidates are verified from that file: an exact duplicate by the full SHA-1, a near
duplicate by the exact Jaccard index of the two texts' shingles (read back and shingled
again), so no decision rests on a hash or an estimate, as with the in-memory shingle sets this
replaces. The work that needs no earlier record (hashing, shingling, MinHash) is done by
`record_keys`, in the filter workers; `DedupState.check` only looks up and verifies, in order.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decontaminate import jaccard, shingles
from .minhash import KeyIndex, band_keys, lsh_params
from .records import Record, Rejection

NUM_PERM = 128
SEED = 1


@dataclass(frozen=True)
class NearParams:
    """Near-duplicate settings: similarity `threshold` on character `ngram` shingles; LSH
    candidates from a lower threshold (0.3 below, at least 0.5) so recall stays high."""

    threshold: float
    ngram: int

    @property
    def bands_rows(self) -> tuple[int, int]:
        return lsh_params(max(0.5, self.threshold - 0.3), NUM_PERM)


def conversation_text(rec: Record) -> str:
    """The text near-duplicate similarity is measured on: every turn, one a line."""
    return "\n".join(m["content"] for m in rec.messages)


def exact_key(rec: Record) -> str:
    """SHA-1 (hex) of the normalised conversation: lower case, whitespace collapsed."""
    norm = "\x1f".join(" ".join(m["content"].lower().split()) for m in rec.messages)
    return hashlib.sha1(norm.encode()).hexdigest()


def record_keys(rec: Record, exact: bool, near: NearParams | None) -> dict:
    """The hashes `DedupState.check` needs for `rec` (JSON-able; computed in a worker)."""
    out: dict = {}
    if exact:
        out["sha1"] = exact_key(rec)
    if near is not None:
        bands, rows = near.bands_rows
        keys = band_keys(shingles(conversation_text(rec), near.ngram), bands, rows, NUM_PERM, SEED)
        out["bands"] = None if keys is None else keys.tobytes().hex()
    return out


class Spill:
    """Append-only entries on disk, read back by number (one JSON line each)."""

    def __init__(self, path: Path | None = None):
        if path is None:
            self._fh = tempfile.TemporaryFile()
        else:
            self._fh = open(path, "w+b")
        self._offsets = array("Q", [0])

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def append(self, entry) -> int:
        """Store `entry`; return its number."""
        data = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        self._fh.seek(self._offsets[-1])
        self._fh.write(data)
        self._offsets.append(self._offsets[-1] + len(data))
        return len(self._offsets) - 2

    def __getitem__(self, i: int):
        self._fh.flush()
        start, end = self._offsets[i], self._offsets[i + 1]
        return json.loads(os.pread(self._fh.fileno(), end - start, start))

    def close(self) -> None:
        self._fh.close()


class DedupState:
    """The records kept so far, as far as duplicate removal needs them. `check` rejects a
    record that repeats (exactly, or above the near threshold) an earlier kept one, and
    otherwise remembers it: the first of a group of duplicates is kept."""

    def __init__(self, exact: bool, near: NearParams | None, spill: Path | None = None):
        self.exact, self.near = exact, near
        self._spill = Spill(spill) if (exact or near) else None
        self._exact = KeyIndex()
        self._near = KeyIndex()

    def check(self, rec_id: str, keys: dict, text: str | None) -> Rejection | None:
        """A Rejection when the record (its `record_keys` and, for near duplicates, its
        `conversation_text`) duplicates an earlier one; else None, and it is remembered."""
        if self._spill is None:
            return None
        sha1 = keys.get("sha1")
        key = None
        if self.exact:
            key = np.frombuffer(bytes.fromhex(sha1[:16]), dtype=np.uint64)
            for i in self._exact.candidates(key):
                if self._spill[i][1] == sha1:
                    return Rejection(rec_id, "duplicate", f"same conversation as {self._spill[i][0]}")
        bands = None
        if self.near is not None and keys.get("bands"):
            bands = np.frombuffer(bytes.fromhex(keys["bands"]), dtype=np.uint64)
            mine = shingles(text, self.near.ngram)
            best, best_sim = None, 0.0
            for i in self._near.candidates(bands):
                other_id, _, other_text = self._spill[i]
                sim = jaccard(mine, shingles(other_text, self.near.ngram))
                if sim > self.near.threshold and (best is None or sim > best_sim):
                    best, best_sim = other_id, sim
            if best is not None:
                if self.exact:  # seen, though not kept: a later exact copy names this one
                    self._exact.add(key.tolist(), self._spill.append([rec_id, sha1, None]))
                return Rejection(rec_id, "near_duplicate", f"{best_sim:.2f} similar to {best}")
        i = self._spill.append([rec_id, sha1, text if bands is not None else None])
        if key is not None:
            self._exact.add(key.tolist(), i)
        if bands is not None:
            self._near.add(bands.tolist(), i)
        return None

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
