"""Benchmark decontamination: drop records whose user query is too similar to a benchmark question.

Similarity is the Jaccard index of character n-gram shingles of normalised text (lowercase,
punctuation removed, whitespace collapsed); Appendix B drops queries with similarity > 0.85.
Comparing every query with every benchmark question is O(N x M); `BenchmarkIndex` instead
indexes the questions' MinHash signatures (rensa) by LSH band keys (`minhash.py`) tuned to a
lower candidate threshold, then verifies each candidate with the exact Jaccard index, so every
match it reports is a true match; recall against brute force is measured by
`scripts/bench_curate.py`.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MissingFileError

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalise(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def shingles(text: str, n: int = 5) -> set[str]:
    """Character n-grams of the normalised text (the whole text when shorter than n)."""
    t = normalise(text)
    if len(t) <= n:
        return {t} if t else set()
    return {t[i:i + n] for i in range(len(t) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


# --------------------------------------------------------------------------- benchmark files
def read_benchmark_questions(path: str | Path) -> list[str]:
    """Questions from a benchmark file or folder in the original schemas.

    Understands ARC-style JSONL (`question`), HellaSwag JSONL (`ctx`), TruthfulQA CSV
    (`Question`), headerless MMLU CSV (first column), JSONL with `question`/`text`, and plain
    text (one question a line). A folder is read recursively.
    """
    p = Path(path)
    if p.is_dir():
        out: list[str] = []
        for f in sorted(p.rglob("*")):
            if f.is_file() and f.suffix in (".jsonl", ".csv", ".txt"):
                out += read_benchmark_questions(f)
        return out
    if not p.is_file():
        raise MissingFileError(f"curate.decontaminate.benchmarks: {p}: file not found")
    if p.suffix == ".jsonl":
        out = []
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                q = row.get("question") or row.get("ctx") or row.get("text")
                if isinstance(q, str) and q.strip():
                    out.append(q)
        return out
    if p.suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        if rows and "Question" in rows[0]:
            col = rows[0].index("Question")
            return [r[col] for r in rows[1:] if len(r) > col and r[col].strip()]
        return [r[0] for r in rows if r and r[0].strip()]
    return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- index
@dataclass
class Match:
    question_index: int
    similarity: float


class ShingleIndex:
    """MinHash-LSH candidates (`minhash.KeyIndex` over band keys) with exact Jaccard
    verification of every candidate; the shingle sets are kept for that verification.

    Items can be added at any time (`add`), so the same index serves a fixed benchmark set and
    a growing set of records.
    """

    def __init__(self, threshold: float = 0.85, ngram: int = 5, num_perm: int = 128,
                 candidate_threshold: float = 0.5, seed: int = 1):
        from .minhash import KeyIndex, lsh_params

        self.threshold, self.ngram, self.num_perm, self.seed = threshold, ngram, num_perm, seed
        self.bands, self.rows = lsh_params(candidate_threshold, num_perm)
        self.keys: list = []
        self._shingles: list[set[str]] = []
        self._index = KeyIndex()

    def band_keys(self, sh: set[str]):
        from .minhash import band_keys

        return band_keys(sh, self.bands, self.rows, self.num_perm, self.seed)

    def add(self, key, text: str) -> None:
        """Index `text` under `key`."""
        sh = shingles(text, self.ngram)
        i = len(self.keys)
        self.keys.append(key)
        self._shingles.append(sh)
        if sh:
            self._index.add(self.band_keys(sh), i)

    def best_match(self, text: str) -> Match | None:
        """The most similar indexed item above `threshold` (its position in `keys`; the
        earliest among equals), or None."""
        sh = shingles(text, self.ngram)
        if not sh:
            return None
        best = None
        for i in self._index.candidates(self.band_keys(sh)):
            sim = jaccard(sh, self._shingles[i])
            if sim > self.threshold and (best is None or sim > best.similarity):
                best = Match(i, sim)
        return best

    def brute_force_match(self, text: str) -> Match | None:
        """The same answer by comparing with every indexed item (the O(M) reference)."""
        sh = shingles(text, self.ngram)
        best = None
        for i, other in enumerate(self._shingles):
            sim = jaccard(sh, other)
            if sim > self.threshold and (best is None or sim > best.similarity):
                best = Match(i, sim)
        return best


class BenchmarkIndex(ShingleIndex):
    """A `ShingleIndex` over benchmark questions (`questions[i]` is match i's question)."""

    def __init__(self, questions: list[str], threshold: float = 0.85, ngram: int = 5,
                 num_perm: int = 128, candidate_threshold: float = 0.5, seed: int = 1):
        super().__init__(threshold, ngram, num_perm, candidate_threshold, seed)
        self.questions = questions
        for i, q in enumerate(questions):
            self.add(i, q)


def planted_paraphrase(text: str, rng: np.random.Generator) -> str:
    """A light edit of `text` (one word dropped or duplicated, case changed) for recall tests."""
    words = text.split()
    if len(words) > 6:
        i = int(rng.integers(0, len(words)))
        words = words[:i] + words[i + 1:] if rng.random() < 0.5 else words[:i + 1] + words[i:]
    out = " ".join(words)
    return out.upper() if rng.random() < 0.3 else out
