"""Benchmark curation: full filter chain throughput, and decontamination index vs brute force.

    python scripts/bench_curate.py [--records 20000] [--benchmarks ../shared/benchmarks]

1. records/s of `curate_dataset` (read, every default filter but decontamination, fit-to-context
   with the tokenizer, train/validation split, write) on a synthetic ShareGPT dump of N records,
   with the tokenizer already loaded; at the Table 4 context (4096 tokens, where the byte bound
   spares tokenising short chats) and at 128 tokens (where most chats are tokenised and split).
2. Decontamination against the benchmark questions: queries are random curated-style questions
   plus planted light paraphrases of benchmark questions. Brute force (every query against every
   question, exact Jaccard) and the MinHash-LSH index run on the same queries in this run;
   recall = share of the brute-force matches the index also reports.

Ends with `records_per_s`, `index_speedup`, `index_recall` lines (`label: value`).

    python scripts/bench_curate.py --rows 1000000 [--benchmarks ../shared/benchmarks]

3. Curation at scale, in memory flat in the row count: an OpenOrca-format file of N generated
   rows (distinct texts of 30-230 words, Zipf-distributed) curated with decontamination (against the benchmark
   files, or generated questions where they are absent) and near-duplicate removal on, every
   core filtering; the same at N/10 rows first. Each size runs in a fresh process, whose peak
   RSS (itself and, separately, its largest filter worker) is measured by the kernel. Prints
   `peak_rss_mb`, `rows_per_s` and `rss_ratio_<N>_vs_<N/10>` (`rss_ratio_1m_vs_100k` for 1M).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from fashionfuse.base_model import load_tokenizer
from fashionfuse.config import RunConfig
from fashionfuse.curate.decontaminate import (
    BenchmarkIndex,
    planted_paraphrase,
    read_benchmark_questions,
)
from fashionfuse.curate.pipeline import curate_dataset
from fashionfuse.demo import COLOURS, OPPOSITES, PEOPLE, SOUNDS

ROOT = Path(__file__).resolve().parents[1]


def synthetic_dump(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            conv = []
            for _ in range(rng.randint(1, 3)):
                p, c = rng.choice(PEOPLE), rng.choice(COLOURS)
                a, b = rng.choice(OPPOSITES)
                animal, sound = rng.choice(SOUNDS)
                q = f"Record {i}: does {p} like {c}, what is the opposite of {a}, and what does a {animal} say?"
                r = f"{p} likes {c}. The opposite of {a} is {b}. A {animal} says {sound}. ({i})"
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": r}]
            model = "gpt-4" if rng.random() > 0.1 else "gpt-3.5-turbo"
            fh.write(json.dumps({"id": f"r{i}", "model": model, "conversations": conv}) + "\n")


def bench_chain(n: int, max_input_len: int = 4096) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "dump.jsonl"
        synthetic_dump(src, n)
        cfg = RunConfig.model_validate({
            "run_dir": f"{tmp}/run",
            "model": {"base": str(ROOT / "data" / "tiny-llama"), "max_input_len": max_input_len},
            "datasets": [{"name": "chat", "kind": "chat", "source": {"format": "sharegpt", "path": str(src)},
                          "filters": {"keep_models": ["gpt-4"]}}],
        })
        tokenizer = load_tokenizer(cfg.model)  # one-off start-up, not per-record work
        out = Path(tmp) / "out"
        out.mkdir()
        t0 = time.perf_counter()
        stats = curate_dataset(cfg, cfg.datasets[0], tokenizer, out)
        elapsed = time.perf_counter() - t0
        print(f"chain (max_input_len {max_input_len}): {n} records in {elapsed:.2f} s "
              f"(read, filters, fit to context, split, write), "
              f"kept {stats['instances']}")
        return n / elapsed


def bench_decontamination(bench_dir: Path, n_queries: int, n_planted: int, seed: int = 0):
    questions = read_benchmark_questions(bench_dir)
    t0 = time.perf_counter()
    index = BenchmarkIndex(questions)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    planted = [planted_paraphrase(questions[int(i)], rng)
               for i in rng.choice(len(questions), n_planted, replace=False)]
    pyrng = random.Random(seed)
    others = [f"What is the opposite of {pyrng.choice(OPPOSITES)[0]} for {pyrng.choice(PEOPLE)} "
              f"number {k}?" for k in range(n_queries - n_planted)]
    queries = planted + others
    pyrng.shuffle(queries)

    t0 = time.perf_counter()
    fast = [index.best_match(q) for q in queries]
    index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = [index.brute_force_match(q) for q in queries]
    brute_s = time.perf_counter() - t0

    truth = [i for i, m in enumerate(slow) if m is not None]
    found = [i for i in truth if fast[i] is not None]
    false_pos = sum(1 for i, m in enumerate(fast) if m is not None and slow[i] is None)
    recall = len(found) / len(truth) if truth else 1.0
    print(f"decontamination: {len(questions)} benchmark questions, index built in {build_s:.1f} s")
    print(f"decontamination: {len(queries)} queries ({n_planted} planted paraphrases), "
          f"brute-force matches {len(truth)}, index matches {len(found)}, false positives {false_pos}")
    print(f"decontamination_index_queries_per_s: {len(queries) / index_s:.1f}")
    print(f"decontamination_brute_force_queries_per_s: {len(queries) / brute_s:.1f}")
    return brute_s / index_s, recall


SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _vocabulary(size: int = 50000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    words: dict[str, None] = {}
    while len(words) < size:
        parts = rng.choice(SYLLABLES, size=int(rng.integers(1, 4)))
        words["".join(parts)] = None
    return np.array(list(words))


def openorca_dump(path: Path, n: int, seed: int = 0) -> None:
    """`n` OpenOrca-format rows of generated text, all distinct (the row number is in each):
    words of a 50,000-word vocabulary drawn by a Zipf law, as in prose. Two unrelated rows
    share a few more character 5-grams than two unrelated real rows (median Jaccard 0.07, 99th
    percentile 0.10; GSM8K's questions and answers: 0.03 and 0.08), so duplicate removal meets
    at least as many LSH candidates as on real text."""
    rng = np.random.default_rng(seed)
    words = _vocabulary()
    with open(path, "w") as fh:
        for start in range(0, n, 10000):
            k = min(10000, n - start)
            q_len = rng.integers(10, 40, size=k)
            r_len = rng.integers(20, 190, size=k)
            picks = (rng.zipf(1.15, size=(k, 230)) - 1) % len(words)
            for j in range(k):
                i = start + j
                q = " ".join(words[picks[j, :q_len[j]]])
                r = " ".join(words[picks[j, q_len[j]:q_len[j] + r_len[j]]])
                fh.write(json.dumps({"id": f"orca-{i}", "system_prompt": "",
                                     "question": f"Question {i}: {q}?",
                                     "response": f"{r.capitalize()}. ({i})"}) + "\n")


def _rss_mb(who) -> float:
    import resource

    return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


def scale_child(rows: int, bench_dir: Path, tmp: Path) -> None:
    """One curation at `rows` rows (in its own process); prints a JSON line of its figures."""
    import resource

    src = tmp / f"orca-{rows}.jsonl"
    openorca_dump(src, rows)
    if bench_dir.is_dir():
        benchmarks = str(bench_dir)
    else:  # generated questions in the benchmark schema, so decontamination still runs
        benchmarks = str(tmp / "questions.jsonl")
        rng = random.Random(1)
        with open(benchmarks, "w") as fh:
            for k in range(20000):
                fh.write(json.dumps({"question": " ".join(rng.choices(SYLLABLES, k=25)) + f" {k}?"}) + "\n")
    cfg = RunConfig.model_validate({
        "run_dir": str(tmp / f"run-{rows}"),
        "model": {"base": str(ROOT / "data" / "tiny-llama"), "max_input_len": 1024},
        "datasets": [{"name": "orca", "kind": "qa", "source": {"format": "openorca", "path": str(src)},
                      "filters": {"near_dedup": {"enabled": True}}}],
        "curate": {"decontaminate": {"benchmarks": [benchmarks]}},
    })
    from fashionfuse.curate.pipeline import build_benchmark_index

    tokenizer = load_tokenizer(cfg.model)
    out = tmp / f"out-{rows}"
    out.mkdir()
    before = _rss_mb(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    index = build_benchmark_index(cfg)
    stats = curate_dataset(cfg, cfg.datasets[0], tokenizer, out, index, work=tmp / f"work-{rows}")
    elapsed = time.perf_counter() - t0
    print(json.dumps({"rows": rows, "seconds": elapsed, "kept": stats["instances"],
                      "funnel": stats["funnel"], "rss_before_mb": before,
                      "peak_rss_mb": _rss_mb(resource.RUSAGE_SELF),
                      "worker_peak_rss_mb": _rss_mb(resource.RUSAGE_CHILDREN)}))


def _short(n: int) -> str:
    for unit, size in (("m", 1_000_000), ("k", 1000)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def bench_scale(rows: int, bench_dir: Path) -> None:
    import subprocess
    import sys

    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (rows // 10, rows):
            proc = subprocess.run([sys.executable, __file__, "--scale-child", str(n),
                                   "--benchmarks", str(bench_dir), "--tmp", tmp],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"curation of {n} rows failed:\n{proc.stderr[-3000:]}")
            figures[n] = json.loads(proc.stdout.strip().splitlines()[-1])
            f = figures[n]
            print(f"scale: {n} rows in {f['seconds']:.1f} s ({n / f['seconds']:.0f} rows/s), kept "
                  f"{f['kept']}, peak RSS {f['peak_rss_mb']:.0f} MB (largest worker "
                  f"{f['worker_peak_rss_mb']:.0f} MB); funnel {f['funnel']}")
    big, small = figures[rows], figures[rows // 10]
    print(f"peak_rss_mb: {big['peak_rss_mb']:.0f}")
    print(f"worker_peak_rss_mb: {big['worker_peak_rss_mb']:.0f}")
    print(f"rows_per_s: {rows / big['seconds']:.0f}")
    print(f"rss_ratio_{_short(rows)}_vs_{_short(rows // 10)}: "
          f"{big['peak_rss_mb'] / small['peak_rss_mb']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=None,
                        help="curation at scale: N generated OpenOrca rows (and N/10 first)")
    parser.add_argument("--scale-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--benchmarks", type=Path, default=ROOT.parent / "shared" / "benchmarks")
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--planted", type=int, default=100)
    args = parser.parse_args()
    if args.scale_child is not None:
        scale_child(args.scale_child, args.benchmarks, args.tmp)
        return
    if args.rows is not None:
        bench_scale(args.rows, args.benchmarks)
        return
    rps = bench_chain(args.records)  # Table 4 context: 4096 tokens
    short = bench_chain(args.records, max_input_len=128)  # most chats need tokenising and splitting
    print(f"records_per_s_max_input_len_128: {short:.1f}")
    speedup, recall = bench_decontamination(args.benchmarks, args.queries, args.planted)
    print(f"records_per_s: {rps:.1f}")
    print(f"index_speedup: {speedup:.1f}")
    print(f"index_recall: {recall:.4f}")


if __name__ == "__main__":
    main()
