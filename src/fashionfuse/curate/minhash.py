"""MinHash signatures (rensa) banded into 64-bit keys, and a compact key -> position index.

Similar texts share at least one band key with high probability (LSH banding: `bands` bands of
`rows` MinHash values each, chosen for a candidate threshold as datasketch chooses them). The
index keeps only the keys and the positions, 12 bytes a key: sorted numpy runs plus a small
dict of the newest keys, so a near-duplicate index over millions of records stays in a few
hundred MB (see `scripts/bench_curate.py --rows`). Candidates are only candidates: callers
verify each one (`dedup.py`, `decontaminate.py`), so no rejection rests on a hash.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@lru_cache(maxsize=None)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the equally weighted areas of
    false positives (similarity below `threshold` made candidates) and false negatives."""
    lo = np.linspace(0.0, threshold, 513)
    hi = np.linspace(threshold, 1.0, 513)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - lo ** r) ** b, lo)
            fn = np.trapezoid((1 - hi ** r) ** b, hi)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


@lru_cache(maxsize=None)
def recall_params(threshold: float, num_perm: int, miss: float = 1e-4) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm such that a pair exactly at `threshold`
    similarity shares no band with probability at most `miss`, (1 - t^rows)^bands <= miss;
    among those, the fewest candidates below the threshold (the smallest area under the
    candidate probability there). Raises ValueError when no banding reaches `miss` (thresholds
    under about 0.07 with 128 permutations)."""
    lo = np.linspace(0.0, threshold, 513)
    best, best_fp = None, float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            if (1 - threshold ** r) ** b > miss:
                continue
            fp = np.trapezoid(1 - (1 - lo ** r) ** b, lo)
            if fp < best_fp:
                best, best_fp = (b, r), fp
    if best is None:
        raise ValueError(f"no LSH banding of {num_perm} permutations misses a pair at "
                         f"similarity {threshold} with probability <= {miss}")
    return best


@lru_cache(maxsize=None)
def _multipliers(n: int) -> np.ndarray:
    return np.random.default_rng(20240607).integers(1, 2 ** 63, size=n, dtype=np.uint64) | np.uint64(1)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the bits of every key."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def signature(shingle_set: set[str], num_perm: int = 128, seed: int = 1) -> np.ndarray | None:
    """The set's MinHash signature (rensa), `num_perm` uint32 values (None for an empty set);
    the share of equal values of two signatures estimates the sets' Jaccard index."""
    if not shingle_set:
        return None
    import rensa

    m = rensa.RMinHash(num_perm=num_perm, seed=seed)
    m.update(list(shingle_set))
    return np.asarray(m.digest(), dtype=np.uint32)


def keys_of(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 key per band of a signature: equal bands always give equal keys; the
    band's number is part of its key."""
    sig = sig[: bands * rows].astype(np.uint64)
    with np.errstate(over="ignore"):
        h = (sig * _multipliers(bands * rows)).reshape(bands, rows).sum(axis=1, dtype=np.uint64)
        h ^= np.arange(1, bands + 1, dtype=np.uint64) * _GOLDEN
        return _mix(h)


def band_keys(shingle_set: set[str], bands: int, rows: int, num_perm: int = 128,
              seed: int = 1) -> np.ndarray | None:
    """One uint64 key per band of the text's MinHash signature (None for an empty set)."""
    sig = signature(shingle_set, num_perm, seed)
    return None if sig is None else keys_of(sig, bands, rows)


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]):
    """Two key-sorted runs as one, without sorting again."""
    (ak, ap), (bk, bp) = a, b
    at = np.searchsorted(ak, bk, side="right") + np.arange(len(bk))
    keys = np.empty(len(ak) + len(bk), dtype=np.uint64)
    pos = np.empty(len(keys), dtype=np.uint32)
    rest = np.ones(len(keys), dtype=bool)
    rest[at] = False
    keys[at], pos[at] = bk, bp
    keys[rest], pos[rest] = ak, ap
    return keys, pos


class KeyIndex:
    """An append-only multimap from uint64 keys to uint32 positions, about 12 bytes a key.

    New keys go to a dict; every `buffer_keys` keys the dict becomes a sorted run, and runs of
    similar size are merged (up to `max_run` keys), so a lookup searches a few runs."""

    def __init__(self, buffer_keys: int = 1 << 16, max_run: int = 1 << 23):
        self.buffer_keys, self.max_run = buffer_keys, max_run
        self._buffer: dict[int, int] = {}  # newest keys: key -> its first position
        self._extra: dict[int, list[int]] = {}  # further positions of a buffered key
        self._buffered = 0
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return self._buffered + sum(len(k) for k, _ in self._runs)

    def add(self, keys: Iterable[int], position: int) -> None:
        """Index `position` under each of `keys`."""
        keys = list(dict.fromkeys(keys.tolist() if isinstance(keys, np.ndarray) else map(int, keys)))
        clash = self._buffer.keys() & keys
        if clash:  # rare: a key already buffered (a duplicate's band)
            for k in clash:
                self._extra.setdefault(k, []).append(position)
            keys = [k for k in keys if k not in clash]
        self._buffer.update(zip(keys, [position] * len(keys)))
        self._buffered += len(keys) + len(clash)
        if self._buffered >= self.buffer_keys:
            self._flush()

    def candidates(self, keys: np.ndarray) -> list[int]:
        """Every position indexed under one of `keys`, ascending, each once."""
        out: set[int] = set()
        for k in keys.tolist():
            hit = self._buffer.get(k)
            if hit is not None:
                out.add(hit)
                out.update(self._extra.get(k, ()))
        for run_keys, run_pos in self._runs:
            lo = np.searchsorted(run_keys, keys, side="left")
            hi = np.searchsorted(run_keys, keys, side="right")
            for a, b in zip(lo[hi > lo].tolist(), hi[hi > lo].tolist()):
                out.update(run_pos[a:b].tolist())
        return sorted(out)

    def _flush(self) -> None:
        if not self._buffer:
            return
        n = len(self._buffer)
        keys = np.fromiter(self._buffer.keys(), dtype=np.uint64, count=n)
        pos = np.fromiter(self._buffer.values(), dtype=np.uint32, count=n)
        if self._extra:
            keys = np.concatenate([keys, np.fromiter(
                (k for k, ps in self._extra.items() for _ in ps), dtype=np.uint64)])
            pos = np.concatenate([pos, np.fromiter(
                (p for ps in self._extra.values() for p in ps), dtype=np.uint32)])
        order = np.argsort(keys, kind="stable")
        self._runs.append((keys[order], pos[order]))
        self._buffer, self._extra, self._buffered = {}, {}, 0
        while (len(self._runs) >= 2 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0])
               and len(self._runs[-2][0]) + len(self._runs[-1][0]) <= self.max_run):
            last = self._runs.pop()
            self._runs[-1] = _merge(self._runs[-1], last)
