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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--benchmarks", type=Path, default=ROOT.parent / "shared" / "benchmarks")
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--planted", type=int, default=100)
    args = parser.parse_args()
    rps = bench_chain(args.records)  # Table 4 context: 4096 tokens
    short = bench_chain(args.records, max_input_len=128)  # most chats need tokenising and splitting
    print(f"records_per_s_max_input_len_128: {short:.1f}")
    speedup, recall = bench_decontamination(args.benchmarks, args.queries, args.planted)
    print(f"records_per_s: {rps:.1f}")
    print(f"index_speedup: {speedup:.1f}")
    print(f"index_recall: {recall:.4f}")


if __name__ == "__main__":
    main()
