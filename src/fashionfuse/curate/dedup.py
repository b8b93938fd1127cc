"""Exact and near-duplicate removal over a stream of records, in memory flat in the row count.

Per record only fixed-size state stays in memory: a 64-bit key of the conversation's SHA-1
(exact duplicates) and one 64-bit key per LSH band of its MinHash signature (near duplicates),
both in `minhash.KeyIndex` (12 bytes a key), plus the record's 8-byte offset in a spill file on
disk. Candidates are verified from disk: an exact duplicate by the full SHA-1; a near duplicate
first by its stored signature (a candidate whose estimated similarity is more than 0.2 below
the threshold is dismissed: for a pair truly above the threshold that estimate, from 128
values, is 7 standard deviations off), then by the exact Jaccard index of the two texts'
shingles (read back and shingled again), so a record is only ever rejected on the exact
measure. The work that needs no earlier record (hashing, shingling, MinHash) is done by
`record_keys`, in the filter workers; `DedupState.check` only looks up and verifies, in order.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decontaminate import jaccard, shingles
from .minhash import KeyIndex, keys_of, recall_params, signature
from .records import Record, Rejection

NUM_PERM = 128
MISS_AT_THRESHOLD = 1e-4  # the chance that LSH never proposes a pair exactly at the threshold
SEED = 1


@dataclass(frozen=True)
class NearParams:
    """Near-duplicate settings: similarity `threshold` on character `ngram` shingles; the LSH
    banding misses a pair at the threshold with probability <= 1e-4 (`recall_params`)."""

    threshold: float
    ngram: int

    @property
    def bands_rows(self) -> tuple[int, int]:
        return recall_params(self.threshold, NUM_PERM, MISS_AT_THRESHOLD)


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
        sig = signature(shingles(conversation_text(rec), near.ngram), NUM_PERM, SEED)
        out["sig"] = None if sig is None else base64.b64encode(sig.tobytes()).decode()
    return out


class Spill:
    """Append-only entries on disk, read back by number (one JSON line each)."""

    def __init__(self, path: Path | None = None):
        if path is None:
            self._fh = tempfile.TemporaryFile()
        else:
            self._fh = open(path, "w+b")
        self._offsets = array("Q", [0])

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
        self._sigs = None  # every spilled record's signature, fixed width, by number
        if near is not None:
            self._sigs = tempfile.TemporaryFile() if spill is None else \
                open(Path(spill).with_suffix(".sigs"), "w+b")

    def _signature(self, i: int) -> np.ndarray:
        width = NUM_PERM * 4
        return np.frombuffer(os.pread(self._sigs.fileno(), width, i * width), dtype=np.uint32)

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
        bands = sig = None
        if self.near is not None and keys.get("sig"):
            sig = np.frombuffer(base64.b64decode(keys["sig"]), dtype=np.uint32)
            bands = keys_of(sig, *self.near.bands_rows)
            mine = None
            best, best_sim = None, 0.0
            for i in self._near.candidates(bands):
                if np.mean(self._signature(i) == sig) < self.near.threshold - 0.2:
                    continue  # far below the threshold (see the module's docstring)
                mine = mine if mine is not None else shingles(text, self.near.ngram)
                other_id, _, other_text = self._spill[i]
                sim = jaccard(mine, shingles(other_text, self.near.ngram))
                if sim > self.near.threshold and (best is None or sim > best_sim):
                    best, best_sim = other_id, sim
            if best is not None:
                if self.exact:  # seen, though not kept: a later exact copy names this one
                    self._exact.add(key.tolist(), self._append([rec_id, sha1, None], None))
                return Rejection(rec_id, "near_duplicate", f"{best_sim:.2f} similar to {best}")
        i = self._append([rec_id, sha1, text if bands is not None else None], sig)
        if key is not None:
            self._exact.add(key.tolist(), i)
        if bands is not None:
            self._near.add(bands.tolist(), i)
        return None

    def _append(self, entry: list, sig: np.ndarray | None) -> int:
        i = self._spill.append(entry)
        if self._sigs is not None:
            data = (sig if sig is not None else np.zeros(NUM_PERM, dtype=np.uint32)).tobytes()
            os.pwrite(self._sigs.fileno(), data, i * len(data))
        return i

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
        if self._sigs is not None:
            self._sigs.close()
