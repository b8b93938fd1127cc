"""The optuna study behind a search: persistence (resume), several workers on one storage, and
the one routine that claims and scores trials (`run_trials`).

Each finished trial is stored (a journal file in the run dir, or any optuna storage URL shared by
workers), so running the same command again continues where it stopped and never repeats a
finished trial. Fixed candidates (grid, random) are enqueued as WAITING trials, which the
storage hands to exactly one worker each; sampler-driven searches (tpe) stop at a trial budget.
A trial whose worker died goes stale (no heartbeat for `stale_after_s`) and its candidate runs
again.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import optuna

from ..config import RunConfig
from ..console import progress_file
from ..adapters.weight_keys import weight_names
from ..fusion import is_dense
from ..fusion.resident import ResidentFusion
from ..rundir import RunLayout
from .registry import search_method

_LIVE = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
_DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass
class SearchContext:
    """What a search method works with: the study, the resident model with every adapter
    attached and the `fusion` that puts a candidate into it, the objective, the adapter names,
    and an optional progress callback (called with the number of trials this worker finished)."""

    cfg: RunConfig
    study: optuna.Study
    model: object
    objective: object
    names: list[str]
    progress: Callable[[int], None] | None = None
    tracker: object = None  # tracking.Tracker: each finished trial's score and weights
    fusion: ResidentFusion | None = None
    method: object = None  # the search method's module, looked up once per search
    storage: object = None  # the study's optuna storage (heartbeats, failing dead trials)

    def __post_init__(self):
        if self.fusion is None:
            self.fusion = ResidentFusion(self.model, self.names)
        if self.method is None:
            self.method = search_method(self.cfg.search.method)

    def evaluate(self, params: dict[str, float], trial=None) -> dict | None:
        """Score the fused model of this candidate (None: a pruner stopped it early)."""
        self.fusion.apply(params)
        return self.objective.score(self.model, trial)

    @property
    def weight_names(self) -> list[str]:
        """The fusion weights a candidate sets: one per adapter, or per adapter and group when
        the method learns layer-wise weights itself."""
        g = self.cfg.search.granularity
        if g == "adapter" or self.cfg.search.layer_weights_from:
            return list(self.names)
        return weight_names(self.names, list(self.fusion.layers), g)

    @property
    def param_names(self) -> list[str]:
        """Every searched value of a candidate: the weights, then the operator's searched
        hyper-parameters (density and others given several values)."""
        return self.weight_names + list(self.cfg.search.searched_params())

    @property
    def distributions(self) -> dict:
        dist = self.method.distributions(self.cfg.search, self.weight_names)
        for name, values in self.cfg.search.searched_params().items():
            dist[name] = optuna.distributions.CategoricalDistribution(values)
        return dist


# --------------------------------------------------------------------------- the study
def worker_seed(seed: int, worker: str | None) -> int:
    """The sampler seed of one search worker: `seed` itself for a lone worker (`worker` None),
    a distinct seed derived from it for each named worker, so workers sharing a study do not
    propose the same points."""
    if worker is None:
        return seed
    digest = hashlib.sha256(f"{seed}:{worker}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def search_worker_id(cfg: RunConfig) -> str | None:
    """Who this search worker is, for its sampler seed: `FASHIONFUSE_WORKER` when set, the
    host and pid when the study lives in a shared `search.storage`, else None (a lone worker,
    seeded with `seed` itself so its run is reproducible)."""
    if os.environ.get("FASHIONFUSE_WORKER"):
        return os.environ["FASHIONFUSE_WORKER"]
    return f"{socket.gethostname()}:{os.getpid()}" if cfg.search.storage else None


def study_storage(cfg: RunConfig) -> optuna.storages.BaseStorage:
    """The study's optuna storage: `search.storage`, a database URL shared by workers (with
    heartbeats, so a dead worker's trial is retried elsewhere), or else a journal file in the
    run dir (`search.work/study.journal`, appended to under a file lock: resumable, and cheaper
    per trial than SQLite's transactions). A run dir whose search began before journal files
    (`search.work/study.db`) keeps its SQLite study, so it resumes."""
    # heartbeats are recorded by our own thread around ask/tell trials (see _Heartbeat)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = cfg.search.storage
    if url is None:
        work = RunLayout(cfg.run_dir).search_work
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "study.db").is_file():
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(str(work / "study.journal")))
        url = f"sqlite:///{(work / 'study.db').resolve()}"
    beat = max(1, int(cfg.search.stale_after_s // 4))
    for attempt in range(5):  # workers starting together race to create the schema: retry
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=beat,
                                              grace_period=int(cfg.search.stale_after_s))
        except Exception as exc:  # sqlalchemy IntegrityError / ProgrammingError
            if attempt == 4 or not ("already exists" in str(exc) or "duplicate key" in str(exc)):
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def open_study(cfg: RunConfig, fp: str, fresh: bool = False
               ) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    """The persistent study of this search (created on first use, reopened on resume) and
    its storage; `fresh` discards its stored trials first (`search-weights --force`)."""
    storage = study_storage(cfg)
    seed = worker_seed(cfg.seed, search_worker_id(cfg))
    sampler = search_method(cfg.search.method).sampler(cfg.search, seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
              if cfg.search.halving_fractions else optuna.pruners.NopPruner())
    if fresh:
        try:
            optuna.delete_study(study_name=f"fusion-{fp}", storage=storage)
        except KeyError:  # nothing stored yet
            pass
    study = optuna.create_study(study_name=f"fusion-{fp}", storage=storage, direction="minimize",
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    return study, storage


def finished(study: optuna.Study, pruned: bool = False) -> list[optuna.trial.FrozenTrial]:
    """Completed trials (and pruned ones with `pruned=True`: they are never run again)."""
    states = {optuna.trial.TrialState.COMPLETE}
    if pruned:
        states.add(optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False) if t.state in states]


def trial_id(storage, study: optuna.Study, trial) -> int:
    """The storage's id of `trial` (a Trial or FrozenTrial of `study`), by public calls."""
    return storage.get_trial_id_from_study_id_trial_number(_study_id(storage, study),
                                                           trial.number)


@functools.lru_cache(maxsize=64)
def _study_id(storage, study: optuna.Study) -> int:
    """A study object's id in its storage (a study deleted and created again under the same
    name is a new object with a new id)."""
    return storage.get_study_id_from_name(study.study_name)


class _Heartbeat:
    """Record a trial's heartbeat in the background while it is evaluated, so other workers
    can tell a slow trial from one whose worker died (optuna records heartbeats only inside
    `study.optimize`; with ask/tell the storage's public `record_heartbeat` is the way in)."""

    def __init__(self, storage, study: optuna.Study, trial: optuna.Trial):
        self.storage, self.trial_id = storage, trial_id(storage, study, trial)
        self.interval = getattr(self.storage, "heartbeat_interval", None) or 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            self.storage.record_heartbeat(self.trial_id)

    def __enter__(self):
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


# --------------------------------------------------------------------------- trials
_WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fail_dead_local_trials(storage, study: optuna.Study) -> int:
    """Fail the running trials of workers on this host whose process is gone (killed), so their
    candidates run again now rather than after `stale_after_s` without a heartbeat."""
    host = socket.gethostname()
    failed = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker_host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if worker_host == host and pid.isdigit() and not _alive(int(pid)):
            storage.set_trial_state_values(trial_id(storage, study, t),
                                           optuna.trial.TrialState.FAIL)
            failed += 1
    return failed
def score_trial(ctx: SearchContext, trial: optuna.Trial, prunable: bool = True) -> None:
    """Evaluate a claimed trial and tell the study; a trial interrupted mid-way is failed (its
    candidate stays to do)."""
    t0 = time.perf_counter()
    trial.set_user_attr("worker", _WORKER)
    try:
        with _Heartbeat(ctx.storage, ctx.study, trial):
            losses = ctx.evaluate({n: trial.params[n] for n in ctx.param_names},
                                  trial if prunable else None)
    except BaseException:
        ctx.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 4))
    if is_dense(ctx.fusion.operator_name):
        trial.set_user_attr("merge_seconds", round(ctx.fusion.merge_seconds, 4))
    if losses is None:  # stopped early by successive halving
        ctx.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        trial.set_user_attr("per_dataset", losses["per_dataset"])
        ctx.study.tell(trial, losses["score"])
        if ctx.tracker is not None:
            ctx.tracker.log(trial.number, {"search/score": losses["score"],
                                           **{f"search/w_{n}": trial.params[n] for n in ctx.names
                                              if n in trial.params}})


def evaluate_candidate(ctx: SearchContext, params: dict, user_attrs: dict | None = None) -> None:
    """Enqueue `params` as a trial, claim it, score it (never pruned)."""
    ctx.study.enqueue_trial(params, user_attrs=user_attrs, skip_if_exists=False)
    score_trial(ctx, ctx.study.ask(ctx.distributions), prunable=False)


_WAIT, _RETRY = "wait", "retry"


def _claim_candidate(ctx: SearchContext, candidates: list[dict]):
    """The next fixed candidate for this worker: a trial, `_WAIT` (others are running the
    rest), `_RETRY`, or None (all done). A candidate enqueued twice by racing workers runs only
    as its lowest-numbered trial; the twin is failed unrun."""
    study = ctx.study
    state: dict[int, set] = {}
    for t in study.get_trials(deepcopy=False):
        i = t.user_attrs.get("candidate")
        if i is not None and t.state in _DONE + _LIVE:
            state.setdefault(i, set()).add(t.state)
    missing = [i for i in range(len(candidates)) if i not in state]
    for i in missing:
        study.enqueue_trial(candidates[i], user_attrs={"candidate": i}, skip_if_exists=False)
    if not missing and not any(optuna.trial.TrialState.WAITING in s for s in state.values()):
        running = any(optuna.trial.TrialState.RUNNING in s for s in state.values())
        return _WAIT if running else None
    trial = study.ask(ctx.distributions)
    index = trial.user_attrs.get("candidate")
    twin = index is None or any(
        t.user_attrs.get("candidate") == index and t.number < trial.number
        and t.state in _DONE + _LIVE for t in study.get_trials(deepcopy=False))
    if twin:  # popped a duplicate (or nothing was left to pop): not run
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return _RETRY
    return trial


def _claim_sampled(ctx: SearchContext, budget: int):
    """The sampler's next candidate while fewer than `budget` trials are live or finished."""
    study = ctx.study
    trials = study.get_trials(deepcopy=False)
    if sum(t.state in _DONE + _LIVE for t in trials) >= budget:
        return _WAIT if any(t.state in _LIVE for t in trials) else None
    trial = study.ask(ctx.distributions)
    before = [t for t in study.get_trials(deepcopy=False)
              if t.number < trial.number and t.state in _DONE + _LIVE]
    if len(before) >= budget:  # another worker filled the budget first
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return _RETRY
    return trial


def run_trials(ctx: SearchContext, candidates: list[dict] | None = None,
               budget: int | None = None) -> None:
    """Claim and score trials until none is left: the fixed `candidates`, or sampler proposals
    up to `budget`; safe for several workers on one study."""
    from tqdm.auto import tqdm

    done_before = len(finished(ctx.study, pruned=True))
    if done_before:
        print(f"search: resuming, {done_before} trials finished")
    total = len(candidates) if candidates is not None else budget
    bar = tqdm(desc="search", unit="trial", total=total, initial=done_before, leave=False,
               file=progress_file())
    ran, waited = 0, False
    try:
        while True:
            optuna.storages.fail_stale_trials(ctx.study)
            fail_dead_local_trials(ctx.storage, ctx.study)
            trial = (_claim_candidate(ctx, candidates) if candidates is not None
                     else _claim_sampled(ctx, budget))
            if trial is None:
                break
            if trial == _RETRY:
                continue
            if trial == _WAIT:
                waited = _wait_for_others(ctx.cfg, waited)
                continue
            score_trial(ctx, trial)
            ran += 1
            bar.update(1)
            if ctx.progress is not None:
                ctx.progress(ran)
    finally:
        bar.close()


def _wait_for_others(cfg: RunConfig, waited: bool) -> bool:
    """Nothing left to claim but other workers' trials are running: wait for them."""
    if not waited:
        print(f"search: waiting for trials running in other workers (or stale after "
              f"{cfg.search.stale_after_s:g} s)")
    time.sleep(min(2.0, cfg.search.stale_after_s / 4))
    return True
