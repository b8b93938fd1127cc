"""`curate(cfg)`: raw sources -> filtered, split, described datasets under run_dir/curate/."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Callable

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
from .filters import build_chain
from .records import MalformedRow, Record, Rejection
from .sources import read_source
from .split import split_to_fit, train_validation_split
from .stats import dataset_stats, table1_markdown


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


def fit_to_context(records: list[tuple[Record, str]], counter: TokenCounter, max_len: int,
                   funnel: Counter, rejects: list[dict]) -> list[Record]:
    """Keep records that fit `max_len` tokens; split longer chats at turn boundaries.

    A text of B UTF-8 bytes has at most B + 1 tokens (byte-level BPE and byte-fallback
    SentencePiece emit at most one token per byte, plus a prefix marker), so only texts above
    that bound are tokenised.
    """
    texts = [counter.render(r.messages, r.system) for r, _ in records]
    unsure = [i for i, t in enumerate(texts) if len(t.encode("utf-8")) + 1 > max_len]
    lengths = [0] * len(texts)
    for i, n in zip(unsure, counter.lengths([texts[i] for i in unsure])):
        lengths[i] = n
    kept: list[Record] = []
    for (rec, where), n in zip(records, lengths):
        if n <= max_len:
            kept.append(rec)
            continue
        pieces = split_to_fit(rec, counter.chat, max_len)
        if isinstance(pieces, Rejection):
            funnel["too_long"] += 1
            rejects.append(Rejection(pieces.id, pieces.filter, pieces.reason, where).to_json())
            continue
        funnel["segments_added"] += len(pieces) - 1
        kept.extend(pieces)
    return kept


def build_benchmark_index(cfg: RunConfig):
    """The decontamination index over every configured benchmark file (None when none)."""
    dc = cfg.curate.decontaminate
    if not dc.benchmarks:
        return None
    questions = [q for path in dc.benchmarks for q in read_benchmark_questions(path)]
    print(f"decontaminate: indexing {len(questions)} benchmark questions")
    return BenchmarkIndex(questions, threshold=dc.threshold, ngram=dc.ngram, num_perm=dc.num_perm,
                          candidate_threshold=dc.candidate_threshold)


CROSS_RECORD_FILTERS = ("duplicate", "near_duplicate")  # need every earlier record: run in order
_WORKER: dict = {}  # per-record filter chain, inherited by forked workers


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
    """Run the per-record filters over one shard (in a worker); persist the result when asked."""
    k, rows, shard_file = job
    if rows is None:  # finished in an earlier, interrupted run
        return json.loads(shard_file.read_text())
    chain, kind, strict = _WORKER["chain"], _WORKER["kind"], _WORKER["strict"]
    funnel: Counter = Counter()
    rejects, passed = [], []
    for where, item in rows:
        funnel["read"] += 1
        if isinstance(item, MalformedRow):
            if strict:
                return {"error": f"{where}: {item}"}
            funnel["malformed"] += 1
            rejects.append(Rejection(f"{_WORKER['name']}-row-{where.rsplit(':', 1)[-1]}",
                                     "malformed", str(item), where).to_json())
            continue
        item.kind = kind
        rec = apply_chain(item, chain, where, funnel, rejects)
        if rec is not None:
            passed.append([rec.to_json(), where])
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


def _filter_shards(cfg: RunConfig, ds: DatasetConfig, benchmark_index, work: Path,
                   progress: Callable[[int], None] | None):
    """Read the source and run the filter chain over it in shards (per-record filters in worker
    processes, cross-record ones here, in shard order); returns the passing records with their
    file:line, the funnel and the rejects."""
    import multiprocessing as mp

    funnel: Counter = Counter()
    rejects: list[dict] = []
    chain = build_chain(ds.filters, benchmark_index)
    per_record = [(n, f) for n, f in chain if n not in CROSS_RECORD_FILTERS]
    cross = [(n, f) for n, f in chain if n in CROSS_RECORD_FILTERS]
    _WORKER.update(chain=per_record, kind=ds.kind, strict=cfg.curate.strict, name=ds.name)
    passed: list[tuple[Record, str]] = []
    src = ds.source
    rows = read_source(src.format, src.path, ds.name, fields=src.fields, hub=src.hub,
                       hub_config=src.hub_config, split=src.split, revision=src.revision)
    jobs = _shards(rows, cfg.curate.shard_size, work)
    nproc = cfg.curate.num_proc or (mp.cpu_count() or 1)
    results = _in_order(_filter_shard, jobs, nproc) if nproc > 1 else map(_filter_shard, jobs)
    bar = tqdm(desc=f"curate {ds.name}", unit="row", leave=False, mininterval=0.5,
               file=progress_file())
    full = False
    try:
        for n_done, res in enumerate(results, 1):
            if "error" in res:
                raise CurationError(res["error"])
            bar.update(res["funnel"].get("read", 0))
            funnel.update(res["funnel"])
            rejects += res["rejects"]
            for rec_json, where in res["passed"]:
                rec = apply_chain(Record(**rec_json), cross, where, funnel, rejects)
                if rec is None:
                    continue
                if ds.kind == "qa" and len(rec.messages) > 2:
                    rec.messages = rec.messages[:2]  # a QA dataset trains on its first exchange
                    funnel["qa_truncated"] += 1
                passed.append((rec, where))
                full = bool(ds.max_records) and len(passed) >= ds.max_records
                if full:
                    break
            if full:
                break
            if progress is not None:
                progress(n_done)
    finally:
        bar.close()
        if nproc > 1:
            results.close()  # stops the workers (see _in_order)
    return passed, funnel, rejects


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


def curate_dataset(cfg: RunConfig, ds: DatasetConfig, tokenizer, out: Path,
                   benchmark_index=None, work: Path | None = None,
                   progress: Callable[[int], None] | None = None) -> dict:
    """Read, filter, fit and split one dataset into `out`; return its statistics.

    Rows are filtered in shards of `curate.shard_size` over `curate.num_proc` processes; each
    finished shard is saved under `work`, so an interrupted run resumes from finished shards
    (`progress` is called with the number of finished shards). Duplicate removal then runs over
    the shards in order, so the output does not depend on the number of processes.
    """
    work = work or Path(out).parent / f".{ds.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    passed, funnel, rejects = _filter_shards(cfg, ds, benchmark_index, work, progress)
    counter = TokenCounter(tokenizer, cfg.model.system_message,
                           template=cfg.model.chat_template)
    kept = fit_to_context(passed, counter, cfg.model.max_input_len, funnel, rejects)
    if ds.max_records:
        kept = kept[: ds.max_records]
    splits = _three_way_split(kept, ds, cfg.seed)
    for split, recs in splits.items():
        (out / f"{split}.jsonl").write_text(
            "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in recs))
    (out / "rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))
    rejected = sum(v for k, v in funnel.items() if k not in NOT_REJECTIONS)
    unused = funnel["read"] + funnel["segments_added"] - len(kept) - rejected
    if unused > 0:  # read, then left out once max_records was reached
        funnel["over_max_records"] = unused
    stats = {"kind": ds.kind, **dataset_stats(kept),
             **{split: len(recs) for split, recs in splits.items()},
             "funnel": dict(sorted(funnel.items())),
             "warnings": funnel_warnings(ds, funnel)}
    write_json(out / "stats.json", stats)
    return stats


def _three_way_split(kept: list[Record], ds: DatasetConfig, seed: int
                     ) -> dict[str, list[Record]]:
    """Split name -> records: train, validation and (with `test_fraction`) test, each share a
    fraction of all records. The test split is held out first, by conversation, with its own
    salt, so no segment of a test chat is trained on or searched on."""
    if not ds.test_fraction:
        return dict(zip(SPLITS, train_validation_split(kept, ds.validation_fraction, seed)))
    rest, test = train_validation_split(kept, ds.test_fraction, f"test:{seed}")
    share = min(ds.validation_fraction * len(kept) / max(len(rest), 1), 0.99)
    return dict(zip(SPLITS, [*train_validation_split(rest, share, seed), test]))


# the curated splits, each written as <split>.jsonl (test only with `test_fraction`)
SPLITS = ("train", "validation", "test")


# funnel counts that are not rows dropped by a filter
NOT_REJECTIONS = ("read", "segments_added", "qa_truncated", "over_max_records")
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
        print(f"curate {ds.name}: read {f.get('read', 0)}, kept {stats['instances']} ({sizes}), "
              f"rejected {sum(v for k, v in f.items() if k not in NOT_REJECTIONS)}")
        for line in stats["warnings"]:
            print(f"curate warning: {line}")
    write_json(layout.root / "curate" / "table1.json", table)
    write_text(layout.root / "curate" / "table1.md", table1_markdown(table))
    return table
