"""`curate(cfg)`: raw sources -> filtered, split, described datasets under run_dir/curate/."""

from __future__ import annotations

import json
import os
import shutil
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..base_model import base_fingerprint_parts, load_tokenizer
from ..chat_template import render_chat
from ..config import DatasetConfig, RunConfig, config_hash
from ..console import progress_file
from ..errors import UserError
from ..rundir import (
    RunLayout,
    atomic_dir,
    fingerprint,
    is_up_to_date,
    path_fingerprint,
    write_json,
    write_manifest,
    write_text,
)
from .decontaminate import BenchmarkIndex, read_benchmark_questions
from .dedup import DedupState, NearParams, conversation_text, record_keys
from .filters import build_chain
from .records import MalformedRow, Record, Rejection
from .sources import read_source
from .split import group_rank, held_out_mask, split_to_fit
from .stats import StatsAccumulator, table1_markdown


class CurationError(UserError, RuntimeError):
    """A malformed row in strict mode, or an unreadable source."""


def curate_fingerprint(cfg: RunConfig, ds: DatasetConfig) -> str:
    """Everything a curated dataset depends on."""
    return fingerprint({
        "stage": "curate", "dataset": ds.model_dump(mode="json"), "seed": cfg.seed,
        "curate": cfg.curate.model_dump(mode="json"), "max_input_len": cfg.model.max_input_len,
        "system": cfg.model.system_message, "tokenizer": base_fingerprint_parts(cfg.model),
        "chat_template": cfg.model.chat_template,
        "source_file": path_fingerprint(ds.source.path) if ds.source.path else None,
        "benchmarks": [path_fingerprint(b) for b in cfg.curate.decontaminate.benchmarks],
    })


class TokenCounter:
    """Token lengths with the configured tokenizer, batched (the Rust tokenizer runs in parallel)."""

    def __init__(self, tokenizer, default_system: str, batch: int = 2048,
                 template: str = "table9"):
        self.tokenizer, self.default_system, self.batch = tokenizer, default_system, batch
        self.template = template

    def render(self, messages: list[dict], system: str | None) -> str:
        """The text training will tokenise (same template), so fitting counts the same tokens."""
        return render_chat(self.tokenizer, messages, system or self.default_system,
                           self.template).text

    def lengths(self, texts: list[str]) -> list[int]:
        out: list[int] = []
        for i in range(0, len(texts), self.batch):
            enc = self.tokenizer(texts[i:i + self.batch], add_special_tokens=False)["input_ids"]
            out += [len(ids) for ids in enc]
        return out

    def chat(self, messages: list[dict], system: str | None) -> int:
        return self.lengths([self.render(messages, system)])[0]


def fit_pieces(records: list[Record], counter: TokenCounter, max_len: int
               ) -> list[list[Record] | Rejection]:
    """Each record as the pieces that fit `max_len` tokens: itself when it fits, a longer chat
    split at turn boundaries, or a Rejection when one exchange alone is too long.

    A text of B UTF-8 bytes has at most B + 1 tokens (byte-level BPE and byte-fallback
    SentencePiece emit at most one token per byte, plus a prefix marker), so only texts above
    that bound are tokenised.
    """
    texts = [counter.render(r.messages, r.system) for r in records]
    unsure = [i for i, t in enumerate(texts) if len(t.encode("utf-8")) + 1 > max_len]
    lengths = [0] * len(texts)
    for i, n in zip(unsure, counter.lengths([texts[i] for i in unsure])):
        lengths[i] = n
    return [[rec] if n <= max_len else split_to_fit(rec, counter.chat, max_len)
            for rec, n in zip(records, lengths)]


def build_benchmark_index(cfg: RunConfig):
    """The decontamination index over every configured benchmark file (None when none)."""
    dc = cfg.curate.decontaminate
    if not dc.benchmarks:
        return None
    questions = [q for path in dc.benchmarks for q in read_benchmark_questions(path)]
    print(f"decontaminate: indexing {len(questions)} benchmark questions")
    return BenchmarkIndex(questions, threshold=dc.threshold, ngram=dc.ngram, num_perm=dc.num_perm,
                          candidate_threshold=dc.candidate_threshold)


_WORKER: dict = {}  # per-record filter chain and settings, inherited by forked workers


def apply_chain(rec: Record, chain, where: str, funnel: Counter, rejects: list[dict]) -> Record | None:
    """Run `rec` through the filters; count and record the first rejection (then None)."""
    for name, flt in chain:
        rec = flt(rec)
        if isinstance(rec, Rejection):
            funnel[name] += 1
            rejects.append(Rejection(rec.id, rec.filter, rec.reason, where).to_json())
            return None
    return rec


def _filter_shard(job: tuple[int, list, Path | None]) -> dict:
    """One shard of raw rows, in a worker: the per-record filters, then for each record that
    passes them the hashes duplicate removal needs and the pieces that fit the context (what
    needs no earlier record). The result is saved when asked, so a rerun skips the shard."""
    k, rows, shard_file = job
    if rows is None:  # finished in an earlier, interrupted run
        return json.loads(shard_file.read_text())
    w = _WORKER
    funnel: Counter = Counter()
    rejects, passed = [], []
    records, places = [], []
    for where, item in rows:
        funnel["read"] += 1
        if isinstance(item, MalformedRow):
            if w["strict"]:
                return {"error": f"{where}: {item}"}
            funnel["malformed"] += 1
            rejects.append(Rejection(f"{w['name']}-row-{where.rsplit(':', 1)[-1]}",
                                     "malformed", str(item), where).to_json())
            continue
        item.kind = w["kind"]
        rec = apply_chain(item, w["chain"], where, funnel, rejects)
        if rec is not None:
            if rec.meta.get("identity_replaced"):
                funnel["identity_rewritten"] += 1  # kept, with its text changed
            records.append(rec)
            places.append(where)
    trained = []
    for rec in records:
        if w["kind"] == "qa" and len(rec.messages) > 2:  # a QA dataset trains on its first exchange
            rec = Record(rec.id, rec.source, rec.kind, rec.system, rec.messages[:2], rec.meta)
        trained.append(rec)
    fits = fit_pieces(trained, w["counter"], w["max_len"])
    for rec, where, short, fit in zip(records, places, trained, fits):
        entry = {"id": rec.id, "where": where,
                 "keys": record_keys(rec, w["exact"], w["near"]),
                 "qa_truncated": short is not rec}
        if w["near"] is not None:
            entry["text"] = conversation_text(rec)
        if isinstance(fit, Rejection):
            entry["too_long"] = fit.reason
        else:
            entry["pieces"] = [p.to_json() for p in fit]
        passed.append(entry)
    result = {"shard": k, "passed": passed, "rejects": rejects, "funnel": dict(funnel)}
    if shard_file is not None:  # compact, atomic: temp file then rename
        tmp = shard_file.with_name(f".{shard_file.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, ensure_ascii=False))
        os.replace(tmp, shard_file)
    return result


def _shards(rows, size: int, work: Path):
    """Group (where, item) rows into numbered shards; finished shards are not re-filtered."""
    batch: list = []
    k = 0
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            done = work / f"shard-{k:06d}.json"
            yield (k, None if done.exists() else batch, done)
            batch, k = [], k + 1
    if batch:
        done = work / f"shard-{k:06d}.json"
        yield (k, None if done.exists() else batch, done)


def _filter_shards(cfg: RunConfig, ds: DatasetConfig, benchmark_index, counter: TokenCounter,
                   work: Path):
    """Read the source and yield its shards' results in order (`_filter_shard`, over
    `curate.num_proc` forked processes); closing the generator stops the workers."""
    import multiprocessing as mp

    chain = build_chain(ds.filters, benchmark_index)
    _WORKER.update(chain=chain, kind=ds.kind, strict=cfg.curate.strict, name=ds.name,
                   counter=counter, max_len=cfg.model.max_input_len, exact=ds.filters.dedup,
                   near=near_params(ds))
    src = ds.source
    rows = read_source(src.format, src.path, ds.name, fields=src.fields, hub=src.hub,
                       hub_config=src.hub_config, split=src.split, revision=src.revision)
    jobs = _shards(rows, cfg.curate.shard_size, work)
    nproc = cfg.curate.num_proc or (mp.cpu_count() or 1)
    results = _in_order(_filter_shard, jobs, nproc) if nproc > 1 else map(_filter_shard, jobs)
    try:
        for res in results:
            if "error" in res:
                raise CurationError(res["error"])
            yield res
    finally:
        if nproc > 1:
            results.close()  # stops the workers (see _in_order)


def near_params(ds: DatasetConfig) -> NearParams | None:
    """The dataset's near-duplicate settings (None when off)."""
    nd = ds.filters.near_dedup
    return NearParams(nd.threshold, nd.ngram) if nd.enabled else None


def _die_with_parent(parent: int) -> None:
    """In a worker: end when the curating process ends, however it ends (SIGTERM or SIGKILL
    leave no chance to shut the pool down): the kernel's parent-death signal on Linux, else a
    thread that watches the parent's pid."""
    import signal
    import threading

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # it ended before the signal was armed
        os._exit(1)


def _in_order(func, jobs, nproc: int):
    """`func` over `jobs` in forked worker processes, results in job order, at most two jobs a
    worker in flight (the job iterator is read lazily). Closing the generator early cancels the
    jobs not started and waits for the running ones: `multiprocessing.Pool.terminate` after an
    early stop could hang for ever, its task thread blocked writing a queued shard to a pipe
    that no killed worker would drain."""
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    executor = ProcessPoolExecutor(nproc, mp_context=mp.get_context("fork"),
                                   initializer=_die_with_parent, initargs=(os.getpid(),))
    pending: deque = deque()
    try:
        for job in jobs:
            pending.append(executor.submit(func, job))
            if len(pending) >= 2 * nproc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


class _Kept:
    """The kept records, streamed to a file, with Table 1's statistics and each record's
    conversation ranks for the split (8 bytes a rank)."""

    def __init__(self, path: Path, ds: DatasetConfig, seed: int):
        self.fh = open(path, "w", encoding="utf-8")
        self.ds, self.seed = ds, seed
        self.stats = StatsAccumulator()
        self.passed = 0  # records past every filter but the context fit
        self.ranks, self.test_ranks = array("Q"), array("Q")

    def add(self, pieces: list[dict]) -> None:
        """Write a record's pieces, up to `max_records` in all."""
        for piece in pieces:
            if self.ds.max_records and self.stats.records >= self.ds.max_records:
                return
            self.fh.write(json.dumps(piece, ensure_ascii=False) + "\n")
            self.stats.add_messages(piece["messages"])
            group = piece["meta"].get("parent", piece["id"])
            self.ranks.append(group_rank(group, self.seed))
            if self.ds.test_fraction:
                self.test_ranks.append(group_rank(group, f"test:{self.seed}"))

    def split(self) -> np.ndarray:
        """Each kept record's split (see `_three_way_split`)."""
        return _three_way_split(np.frombuffer(self.ranks, dtype=np.uint64),
                                np.frombuffer(self.test_ranks, dtype=np.uint64), self.ds)


def curate_dataset(cfg: RunConfig, ds: DatasetConfig, tokenizer, out: Path,
                   benchmark_index=None, work: Path | None = None,
                   progress: Callable[[int], None] | None = None) -> dict:
    """Read, filter, fit and split one dataset into `out`; return its statistics.

    Streams: rows are filtered in shards of `curate.shard_size` over `curate.num_proc`
    processes, and each finished shard is saved under `work`, so an interrupted run resumes
    from finished shards (`progress` is called with the number of finished shards). Duplicate
    removal then runs over the shards in order (the output does not depend on the number of
    processes), kept records and rejects go straight to files, and the split is made from the
    kept file: memory does not grow with the dataset beyond a few dozen bytes a record.
    """
    work = work or Path(out).parent / f".{ds.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    counter = TokenCounter(tokenizer, cfg.model.system_message,
                           template=cfg.model.chat_template)
    funnel: Counter = Counter()
    kept = _Kept(work / "kept.jsonl", ds, cfg.seed)
    dedup = DedupState(ds.filters.dedup, near_params(ds), spill=work / "seen.spill")
    bar = tqdm(desc=f"curate {ds.name}", unit="row", leave=False, mininterval=0.5,
               file=progress_file())
    shards = _filter_shards(cfg, ds, benchmark_index, counter, work)
    try:
        with kept.fh, open(out / "rejects.jsonl", "w", encoding="utf-8") as rejects:
            for n_done, res in enumerate(shards, 1):
                bar.update(res["funnel"].get("read", 0))
                funnel.update(res["funnel"])
                rejects.writelines(json.dumps(r) + "\n" for r in res["rejects"])
                full = _keep_in_order(res["passed"], dedup, kept, funnel, rejects, ds.max_records)
                if full:
                    break
                if progress is not None:
                    progress(n_done)
    finally:
        shards.close()
        bar.close()
        dedup.close()
    sizes = _write_splits(work / "kept.jsonl", kept.split(), out, 3 if ds.test_fraction else 2)
    (work / "kept.jsonl").unlink()
    rejected = sum(v for k, v in funnel.items() if k not in NOT_REJECTIONS)
    unused = funnel["read"] + funnel["segments_added"] - kept.stats.records - rejected
    if unused > 0:  # read, then left out once max_records was reached
        funnel["over_max_records"] = unused
    stats = {"kind": ds.kind, **kept.stats.result(), **sizes,
             "funnel": dict(sorted(funnel.items())),
             "warnings": funnel_warnings(ds, funnel)}
    write_json(out / "stats.json", stats)
    return stats


def _keep_in_order(passed: list[dict], dedup: DedupState, kept: _Kept, funnel: Counter,
                   rejects, max_records: int | None) -> bool:
    """One shard's records that passed the per-record filters, in order: duplicates of earlier
    records rejected, the rest counted and kept (their pieces) or rejected as too long. True
    once `max_records` records have passed (the rest of the source is not read)."""
    def reject(entry: dict, name: str, reason: str) -> None:
        funnel[name] += 1
        rejects.write(json.dumps(Rejection(entry["id"], name, reason, entry["where"]).to_json())
                      + "\n")

    for entry in passed:
        rejection = dedup.check(entry["id"], entry["keys"], entry.get("text"))
        if rejection is not None:
            reject(entry, rejection.filter, rejection.reason)
            continue
        kept.passed += 1
        if entry["qa_truncated"]:
            funnel["qa_truncated"] += 1
        if "too_long" in entry:
            reject(entry, "too_long", entry["too_long"])
        else:
            if len(entry["pieces"]) > 1:
                funnel["segments_added"] += len(entry["pieces"]) - 1
            kept.add(entry["pieces"])
        if max_records and kept.passed >= max_records:
            return True
    return False


def _write_splits(kept_file: Path, split_of: np.ndarray, out: Path, n_splits: int
                  ) -> dict[str, int]:
    """Copy the kept file's lines into the first `n_splits` <split>.jsonl files by `split_of`
    (an index into SPLITS for each line); the number of records in each split."""
    written = range(n_splits)
    handles = {k: open(out / f"{SPLITS[k]}.jsonl", "w", encoding="utf-8") for k in written}
    try:
        with open(kept_file, encoding="utf-8") as fh:
            for line, k in zip(fh, split_of.tolist()):
                handles[k].write(line)
    finally:
        for h in handles.values():
            h.close()
    return {SPLITS[k]: int(np.count_nonzero(split_of == k)) for k in written}


def _three_way_split(ranks: np.ndarray, test_ranks: np.ndarray, ds: DatasetConfig
                     ) -> np.ndarray:
    """Each kept record's split (0 train, 1 validation, 2 test), from its conversation's seeded
    ranks: with `test_fraction` the test split is held out first, by conversation, with its own
    salt, so no segment of a test chat is trained on or searched on; validation then takes
    `validation_fraction` of all records from the rest."""
    split = np.zeros(len(ranks), dtype=np.int8)
    if not ds.test_fraction:
        split[held_out_mask(ranks, ds.validation_fraction)] = 1
        return split
    test = held_out_mask(test_ranks, ds.test_fraction)
    rest = np.flatnonzero(~test)
    share = min(ds.validation_fraction * len(ranks) / max(len(rest), 1), 0.99)
    split[test] = 2
    split[rest[held_out_mask(ranks[rest], share)]] = 1
    return split


# the curated splits, each written as <split>.jsonl (test only with `test_fraction`)
SPLITS = ("train", "validation", "test")


# funnel counts that are not rows dropped by a filter
NOT_REJECTIONS = ("read", "segments_added", "qa_truncated", "over_max_records",
                  "identity_rewritten")
# the setting to look at when a filter drops most of a dataset
FILTER_SETTINGS = {
    "malformed": "datasets[].source.format / fields (or the file itself)",
    "structure": "datasets[].source.format (roles must alternate user/assistant)",
    "answering_model": "datasets[].filters.keep_models",
    "blank_response": "datasets[].filters.drop_blank",
    "refusal": "datasets[].filters.refusal_patterns / drop_refusals",
    "identity": "datasets[].filters.identity.action",
    "language": "datasets[].filters.languages",
    "toxicity": "datasets[].filters.toxicity",
    "toxicity_classifier": "datasets[].filters.toxicity.classifier_threshold",
    "topic": "datasets[].filters.topics",
    "response_length": "datasets[].filters.min_response_chars / max_response_chars",
    "duplicate": "datasets[].filters.dedup",
    "near_duplicate": "datasets[].filters.near_dedup.threshold",
    "decontamination": "curate.decontaminate.threshold",
    "too_long": "model.max_input_len",
}


def funnel_warnings(ds: DatasetConfig, funnel: Counter) -> list[str]:
    """One line for each filter that removed more than half of the rows considered (read, less
    those left out once `max_records` was reached)."""
    seen = funnel.get("read", 0) - funnel.get("over_max_records", 0)
    return [f"{ds.name}: filter {name!r} removed {n} of {seen} rows ({100 * n / seen:.0f} %); "
            f"check {FILTER_SETTINGS.get(name, 'its settings')}"
            for name, n in sorted(funnel.items())
            if name not in NOT_REJECTIONS and seen > 0 and n > seen / 2]


def curate(cfg: RunConfig, force: bool = False) -> dict[str, dict]:
    """Curate every configured dataset (skipping up-to-date ones); write Table 1."""
    layout = RunLayout(cfg.run_dir)
    tokenizer = None
    index = None
    table: dict[str, dict] = {}
    for ds in cfg.datasets:
        out = layout.curated(ds.name)
        fp = curate_fingerprint(cfg, ds)
        if not force and is_up_to_date(out, fp):
            table[ds.name] = json.loads((out / "stats.json").read_text())
            print(f"curate {ds.name}: up to date")
            continue
        if ds.source.path and not Path(ds.source.path).is_file():
            raise CurationError(f"datasets[{ds.name}].source.path: {ds.source.path}: file not found")
        tokenizer = tokenizer or load_tokenizer(cfg.model)
        index = index or build_benchmark_index(cfg)
        work = layout.root / "curate" / f".{ds.name}.work"
        if (work / "fingerprint").exists() and (work / "fingerprint").read_text() != fp:
            shutil.rmtree(work)  # shards of other inputs or settings
        work.mkdir(parents=True, exist_ok=True)
        (work / "fingerprint").write_text(fp)
        if any(work.glob("shard-*.json")):
            print(f"curate {ds.name}: resuming from {len(list(work.glob('shard-*.json')))} finished shards")
        with atomic_dir(out) as tmp:
            stats = curate_dataset(cfg, ds, tokenizer, tmp, index, work=work)
            write_manifest(tmp, stage="curate", fingerprint=fp, config_hash=config_hash(ds),
                           inputs={ds.source.path or ds.source.hub: path_fingerprint(ds.source.path)
                                   if ds.source.path else ds.source.revision or "hub"},
                           seed=cfg.seed, metrics=stats,
                           content=[f"{s}.jsonl" for s in SPLITS if s in stats])
        shutil.rmtree(work, ignore_errors=True)
        table[ds.name] = stats
        f = stats["funnel"]
        sizes = ", ".join(f"{split} {stats[split]}" for split in SPLITS if split in stats)
        rewritten = (f", identity mentions rewritten in {f['identity_rewritten']}"
                     if f.get("identity_rewritten") else "")
        print(f"curate {ds.name}: read {f.get('read', 0)}, kept {stats['instances']} ({sizes}), "
              f"rejected {sum(v for k, v in f.items() if k not in NOT_REJECTIONS)}{rewritten}")
        for line in stats["warnings"]:
            print(f"curate warning: {line}")
    write_json(layout.root / "curate" / "table1.json", table)
    write_text(layout.root / "curate" / "table1.md", table1_markdown(table))
    return table
