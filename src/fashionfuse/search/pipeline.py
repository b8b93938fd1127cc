"""`search_weights(cfg)`: find fusion weights on a held-out objective, export the fused adapter.

The base model is loaded once with every adapter attached; a candidate only changes LoRA
scales in memory. Each finished trial is stored in an optuna study (SQLite in the run dir), so
running the same command again after an interruption continues where it stopped and never
repeats a finished trial.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path

import optuna
from tqdm.auto import tqdm

from ..architectures import check_tokenizer_fits
from ..base_model import base_fingerprint_parts, default_device, load_base_model, load_tokenizer
from ..config import RunConfig, config_hash
from ..lora import attach_adapters, fuse_adapters, load_saved_adapter, save_peft_adapter, set_fusion_weights
from ..rundir import (RunLayout, artifact_id, atomic_dir, fingerprint, is_up_to_date, read_manifest, write_json,
                      write_manifest)
from .objectives import LmEvalObjective, ValidationLoss
from .samplers import CANDIDATE_LISTS, SAMPLERS, distributions, worker_seed


class SearchError(RuntimeError):
    """The search cannot run (missing adapters, bad objective)."""


def search_fingerprint(cfg: RunConfig) -> str:
    """Everything the search result depends on: adapters, objective data, search section."""
    layout = RunLayout(cfg.run_dir)
    return fingerprint({
        "stage": "search", "search": cfg.search.model_dump(mode="json"), "seed": cfg.seed,
        "base": base_fingerprint_parts(cfg.model), "model": cfg.model.model_dump(mode="json"),
        "adapters": {n: artifact_id(layout.adapter(n)) for n in cfg.search_adapters},
        "curated": {n: artifact_id(layout.curated(n)) for n in cfg.objective_datasets},
    })


def search_worker_id(cfg: RunConfig) -> str | None:
    """Who this search worker is, for its sampler seed: `FASHIONFUSE_WORKER` when set, the
    host and pid when the study lives in a shared `search.storage`, else None (a lone worker,
    seeded with `seed` itself so its run is reproducible)."""
    if os.environ.get("FASHIONFUSE_WORKER"):
        return os.environ["FASHIONFUSE_WORKER"]
    return f"{socket.gethostname()}:{os.getpid()}" if cfg.search.storage else None


def open_study(cfg: RunConfig, fp: str, fresh: bool = False) -> optuna.Study:
    """The persistent study of this search (created on first use, reopened on resume);
    `fresh` discards its stored trials first (`search-weights --force`)."""
    url = cfg.search.storage
    if url is None:
        work = RunLayout(cfg.run_dir).search_work
        work.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(work / 'study.db').resolve()}"
    beat = max(1, int(cfg.search.stale_after_s // 4))
    # heartbeats are recorded by our own thread around ask/tell trials (see _Heartbeat)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for attempt in range(5):  # workers starting together race to create the schema: retry
        try:
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=beat,
                                                 grace_period=int(cfg.search.stale_after_s))
            break
        except Exception as exc:  # sqlalchemy IntegrityError / ProgrammingError
            if attempt == 4 or not ("already exists" in str(exc) or "duplicate key" in str(exc)):
                raise
            time.sleep(0.5 + attempt)
    sampler_factory = SAMPLERS.get(cfg.search.method)
    seed = worker_seed(cfg.seed, search_worker_id(cfg))
    sampler = sampler_factory(seed) if sampler_factory else optuna.samplers.RandomSampler(seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
              if cfg.search.halving_fractions else optuna.pruners.NopPruner())
    if fresh:
        try:
            optuna.delete_study(study_name=f"fusion-{fp}", storage=storage)
        except KeyError:  # nothing stored yet
            pass
    return optuna.create_study(study_name=f"fusion-{fp}", storage=storage, direction="minimize",
                               sampler=sampler, pruner=pruner, load_if_exists=True)


def _finished(study: optuna.Study, pruned: bool = False) -> list[optuna.trial.FrozenTrial]:
    """Completed trials (and pruned ones with `pruned=True`: they are never run again)."""
    states = {optuna.trial.TrialState.COMPLETE}
    if pruned:
        states.add(optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False) if t.state in states]


class _Heartbeat:
    """Record a trial's heartbeat in the background while it is evaluated, so other workers
    can tell a slow trial from one whose worker died."""

    def __init__(self, study: optuna.Study, trial_id: int):
        self.storage, self.trial_id = study._storage, trial_id
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


def _score_trial(study: optuna.Study, trial: optuna.Trial, names: list[str], evaluate,
                 prunable: bool) -> None:
    """Evaluate a claimed trial and tell the study; a trial interrupted mid-way is failed (its
    candidate stays to do)."""
    t0 = time.perf_counter()
    try:
        with _Heartbeat(study, trial._trial_id):
            losses = evaluate({n: float(trial.params[n]) for n in names}, trial if prunable else None)
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 4))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    if losses is None:  # stopped early by successive halving
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        trial.set_user_attr("per_dataset", losses["per_dataset"])
        study.tell(trial, losses["score"])


def _evaluate_candidate(study: optuna.Study, dists, names: list[str], evaluate,
                        params: dict | None = None, user_attrs: dict | None = None,
                        prunable: bool = False) -> None:
    """Ask for one trial (the enqueued `params`, or the sampler's choice), score it, tell it."""
    if params is not None:
        study.enqueue_trial(params, user_attrs=user_attrs, skip_if_exists=False)
    _score_trial(study, study.ask(dists), names, evaluate, prunable)


_LIVE = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
_DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def run_trials(cfg: RunConfig, study: optuna.Study, evaluate, names: list[str],
               stop_after: int | None = None) -> None:
    """Evaluate the candidates not yet finished in `study`, persisting each as it completes.

    Safe for several workers on one study: fixed candidates (grid, random) are enqueued as
    WAITING trials, which the storage hands to exactly one worker each; a candidate enqueued
    twice by racing workers runs only as its lowest-numbered trial. Sampler-driven searches stop
    at `n_trials` live or finished trials. Trials of a killed worker go stale (no heartbeat for
    `stale_after_s`) and their candidates are run again.
    """
    dists = distributions(cfg.search, names)
    fixed = CANDIDATE_LISTS.get(cfg.search.method)
    candidates = fixed(cfg.search, names, cfg.seed) if fixed is not None else None
    done_before = len(_finished(study, pruned=True))
    if done_before:
        print(f"search: resuming, {done_before} trials finished")
    bar = tqdm(desc="search", unit="trial", leave=False)
    ran, waited = 0, False
    while True:
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        if candidates is None:
            if sum(t.state in _DONE + _LIVE for t in trials) >= cfg.search.n_trials:
                if not any(t.state in _LIVE for t in trials):
                    break
                waited = _wait_for_others(cfg, waited)
                continue
            trial = study.ask(dists)
            before = [t for t in study.get_trials(deepcopy=False)
                      if t.number < trial.number and t.state in _DONE + _LIVE]
            if len(before) >= cfg.search.n_trials:  # another worker filled the budget first
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
        else:
            state = {}
            for t in trials:
                i = t.user_attrs.get("candidate")
                if i is not None and t.state in _DONE + _LIVE:
                    state.setdefault(i, set()).add(t.state)
            missing = [i for i in range(len(candidates)) if i not in state]
            for i in missing:
                study.enqueue_trial(candidates[i], user_attrs={"candidate": i},
                                    skip_if_exists=False)
            waiting = missing or any(optuna.trial.TrialState.WAITING in s for s in state.values())
            if not waiting:
                if not any(optuna.trial.TrialState.RUNNING in s for s in state.values()):
                    break
                waited = _wait_for_others(cfg, waited)
                continue
            trial = study.ask(dists)
            index = trial.user_attrs.get("candidate")
            twin = index is None or any(
                t.user_attrs.get("candidate") == index and t.number < trial.number
                and t.state in _DONE + _LIVE for t in study.get_trials(deepcopy=False))
            if twin:  # popped a duplicate (or nothing was left to pop): not run
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
        _score_trial(study, trial, names, evaluate, prunable=True)
        ran += 1
        bar.update(1)
        if stop_after is not None and ran >= stop_after:
            bar.close()
            raise KeyboardInterrupt(f"stopped after {ran} trials (test hook)")
    bar.close()


def _wait_for_others(cfg: RunConfig, waited: bool) -> bool:
    """Nothing left to claim but other workers' trials are running: wait for them."""
    if not waited:
        print(f"search: waiting for trials running in other workers (or stale after "
              f"{cfg.search.stale_after_s:g} s)")
    time.sleep(min(2.0, cfg.search.stale_after_s / 4))
    return True


def learn_trials(cfg: RunConfig, study: optuna.Study, model, objective, evaluate, names) -> None:
    """`method: gradient`: store the start point and the learned weights as two trials."""
    from .gradient import learn_weights

    if any(t.user_attrs.get("point") == "learned" for t in _finished(study)):
        print("search: learned weights already stored")
        return
    start = cfg.search.gradient_init
    start = (cfg.search.low + cfg.search.high) / 2 if start is None else start
    init = {n: float(start) for n in names}
    learned, history = learn_weights(model, objective, names, cfg.search, init)
    dists = distributions(cfg.search, names)
    _evaluate_candidate(study, dists, names, evaluate, init, {"point": "start"})
    _evaluate_candidate(study, dists, names, evaluate, learned,
                        {"point": "learned", "history": history})


def _plots(trials: list[dict], names: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.2 * (len(names) + 1), 3))
    scores = [t["score"] for t in trials]
    for ax, n in zip(axes, names):
        ax.scatter([t["weights"][n] for t in trials], scores, s=12)
        ax.set_xlabel(f"w[{n}]")
        ax.set_ylabel("objective")
    best = [min(scores[: i + 1]) for i in range(len(scores))]
    axes[-1].plot(range(1, len(best) + 1), best)
    axes[-1].set_xlabel("trials")
    axes[-1].set_ylabel("best objective")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def search_weights(cfg: RunConfig, force: bool = False, stop_after: int | None = None) -> dict:
    """Search fusion weights, then write trials, best weights, plots and the fused adapter."""
    layout = RunLayout(cfg.run_dir)
    names = cfg.search_adapters
    fp = search_fingerprint(cfg)
    if not force and is_up_to_date(layout.search, fp):
        print("search: up to date")
        return json.loads((layout.search / "best.json").read_text())
    adapter_dirs = {n: layout.adapter(n) for n in names}
    missing = [str(p) for p in adapter_dirs.values() if not (p / "adapter_config.json").exists()]
    if missing:
        raise SearchError(f"adapters missing: {missing} (run `fashionfuse train-adapter` first)")
    saved = [load_saved_adapter(adapter_dirs[n]) for n in names]
    fuse_adapters(saved, [1.0] * len(saved))  # refuse unfusable sets before any compute

    device = default_device()
    tokenizer = load_tokenizer(cfg.model)
    base = load_base_model(cfg.model, device=device)
    check_tokenizer_fits(base, tokenizer)
    model = attach_adapters(base, adapter_dirs)
    obj_type = cfg.search.objective.type
    objective = ValidationLoss.from_config(cfg, tokenizer, device)
    task_objective = LmEvalObjective(cfg, tokenizer) if obj_type in ("lm_eval", "mix") else None
    if cfg.search.method == "gradient" and task_objective is not None:
        raise SearchError("search.method: gradient needs a differentiable objective (val_loss)")

    fractions = cfg.search.halving_fractions

    def evaluate(weights: dict[str, float], trial=None) -> dict | None:
        set_fusion_weights(model, weights)
        if task_objective is not None:
            per = objective.per_dataset(model) if obj_type == "mix" else {}
            tasks = task_objective.score(model)
            accuracy = sum(tasks.values()) / max(len(tasks), 1)
            score = -accuracy if obj_type == "lm_eval" else (
                (1 - cfg.search.objective.mix_weight) * objective.combine(per)
                - cfg.search.objective.mix_weight * accuracy)
            return {"per_dataset": {**per, **{f"task:{k}": v for k, v in tasks.items()}},
                    "score": score}
        if not fractions or trial is None:
            per = objective.per_dataset(model)
            return {"per_dataset": per, "score": objective.combine(per)}
        # steps count from 1: SuccessiveHalvingPruner's first rung is at step min_resource=1
        for step, (frac, per) in enumerate(objective.staged(model), start=1):
            trial.report(objective.combine(per), step)
            trial.set_user_attr("fraction_evaluated", frac)
            if frac < 1.0 and trial.should_prune():
                return None
        return {"per_dataset": per, "score": objective.combine(per)}

    study = open_study(cfg, fp, fresh=force)
    if cfg.search.method == "gradient":
        learn_trials(cfg, study, model, objective, evaluate, names)
    else:
        run_trials(cfg, study, evaluate, names, stop_after=stop_after)

    trials = [{"number": t.number, "weights": {n: t.params[n] for n in names}, "score": t.value,
               "per_dataset": t.user_attrs.get("per_dataset"), "seconds": t.user_attrs.get("seconds")}
              for t in _finished(study)]
    best = min(trials, key=lambda t: t["score"])
    pruned = len(_finished(study, pruned=True)) - len(trials)
    result = {"method": cfg.search.method, "objective": cfg.search.objective.type,
              "adapters": names, "best_weights": best["weights"], "best_score": best["score"],
              "best_per_dataset": best["per_dataset"], "n_trials": len(trials),
              "n_pruned": pruned}
    if not force and is_up_to_date(layout.search, fp):
        print("search: another worker wrote the result")
        return json.loads((layout.search / "best.json").read_text())
    with atomic_dir(layout.search) as tmp:
        write_json(tmp / "trials.json", trials)
        with open(tmp / "trials.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["number", *[f"w_{n}" for n in names], "score", "seconds"])
            for t in trials:
                w.writerow([t["number"], *[t["weights"][n] for n in names], t["score"], t["seconds"]])
        write_json(tmp / "best.json", result)
        config, tensors = fuse_adapters(saved, [best["weights"][n] for n in names])
        save_peft_adapter(tmp / "fused", config, tensors)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                  "special_tokens_map.json", "tokenizer.model"):
            if (adapter_dirs[names[0]] / f).exists():
                shutil.copy(adapter_dirs[names[0]] / f, tmp / "fused" / f)
        _plots(trials, names, tmp / "search.png")
        metrics = {"best_score": best["score"], "n_trials": len(trials)}
        if cfg.search.export_merged:
            from ..base_model import DTYPES
            from ..lora import export_merged_model

            report = export_merged_model(cfg.model, tmp / "fused", tmp / "merged",
                                         DTYPES.get(cfg.search.export_dtype))
            metrics["merged_update_relative_error"] = report["update_relative_error"]
            metrics["merged_dtype"] = report["dtype"]
        write_manifest(tmp, stage="search", fingerprint=fp, config_hash=config_hash(cfg.search),
                       inputs={n: artifact_id(adapter_dirs[n]) for n in names},
                       seed=cfg.seed, metrics=metrics,
                       extra={"best_weights": best["weights"]},
                       content=["fused/adapter_model.safetensors", "fused/adapter_config.json"])
    print(f"search: {len(trials)} trials ({pruned} pruned), best {best['weights']} -> {best['score']:.4f}")
    return result
