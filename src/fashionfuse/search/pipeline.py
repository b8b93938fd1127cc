"""`search_weights(cfg)`: find fusion weights on a held-out objective, export the fused adapter.

The base model is loaded once with every adapter attached; a candidate only changes LoRA
scales in memory. Each finished trial is stored in an optuna study (SQLite in the run dir), so
running the same command again after an interruption continues where it stopped and never
repeats a finished trial.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import optuna
from tqdm.auto import tqdm

from ..base_model import base_fingerprint_parts, default_device, load_base_model, load_tokenizer
from ..config import RunConfig, config_hash
from ..lora import attach_adapters, fuse_adapters, load_saved_adapter, save_peft_adapter, set_fusion_weights
from ..rundir import RunLayout, atomic_dir, fingerprint, read_manifest, write_json, write_manifest
from .objectives import LmEvalObjective, ValidationLoss
from .samplers import CANDIDATE_LISTS, SAMPLERS, distributions


class SearchError(RuntimeError):
    """The search cannot run (missing adapters, bad objective)."""


def search_fingerprint(cfg: RunConfig) -> str:
    """Everything the search result depends on: adapters, objective data, search section."""
    layout = RunLayout(cfg.run_dir)
    return fingerprint({
        "stage": "search", "search": cfg.search.model_dump(mode="json"), "seed": cfg.seed,
        "base": base_fingerprint_parts(cfg.model), "model": cfg.model.model_dump(mode="json"),
        "adapters": {n: (read_manifest(layout.adapter(n)) or {}).get("fingerprint")
                     for n in cfg.search_adapters},
        "curated": {n: (read_manifest(layout.curated(n)) or {}).get("fingerprint")
                    for n in cfg.objective_datasets},
    })


def open_study(cfg: RunConfig, fp: str) -> optuna.Study:
    """The persistent study of this search (created on first use, reopened on resume)."""
    work = RunLayout(cfg.run_dir).search_work
    work.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(work / 'study.db').resolve()}"
    sampler_factory = SAMPLERS.get(cfg.search.method)
    sampler = sampler_factory(cfg.seed) if sampler_factory else optuna.samplers.RandomSampler(cfg.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
              if cfg.search.halving_fractions else optuna.pruners.NopPruner())
    return optuna.create_study(study_name=f"fusion-{fp}", storage=storage, direction="minimize",
                               sampler=sampler, pruner=pruner, load_if_exists=True)


def _finished(study: optuna.Study, pruned: bool = False) -> list[optuna.trial.FrozenTrial]:
    """Completed trials (and pruned ones with `pruned=True`: they are never run again)."""
    states = {optuna.trial.TrialState.COMPLETE}
    if pruned:
        states.add(optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False) if t.state in states]


def _evaluate_candidate(study: optuna.Study, dists, names: list[str], evaluate,
                        params: dict | None = None, user_attrs: dict | None = None,
                        prunable: bool = False) -> None:
    """Ask for one trial (the enqueued `params`, or the sampler's choice), score it, tell it."""
    if params is not None:
        study.enqueue_trial(params, user_attrs=user_attrs, skip_if_exists=False)
    trial = study.ask(dists)
    t0 = time.perf_counter()
    losses = evaluate({n: float(trial.params[n]) for n in names}, trial if prunable else None)
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 4))
    if losses is None:  # stopped early by successive halving
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        trial.set_user_attr("per_dataset", losses["per_dataset"])
        study.tell(trial, losses["score"])


def run_trials(cfg: RunConfig, study: optuna.Study, evaluate, names: list[str],
               stop_after: int | None = None) -> None:
    """Evaluate the candidates not yet finished in `study`, persisting each as it completes."""
    dists = distributions(cfg.search, names)
    done = _finished(study, pruned=True)
    fixed = CANDIDATE_LISTS.get(cfg.search.method)
    if fixed is not None:
        candidates = fixed(cfg.search, names, cfg.seed)
        finished_idx = {t.user_attrs.get("candidate") for t in done}
        todo = [(i, c) for i, c in enumerate(candidates) if i not in finished_idx]
    else:
        todo = [(None, None)] * max(0, cfg.search.n_trials - len(done))
    # trials left RUNNING by a killed process are marked failed so they are not counted
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    if done:
        print(f"search: resuming, {len(done)} trials finished, {len(todo)} to go")
    for k, (index, params) in enumerate(tqdm(todo, desc="search", unit="trial", leave=False)):
        attrs = {"candidate": index} if params is not None else None
        _evaluate_candidate(study, dists, names, evaluate, params, attrs, prunable=True)
        if stop_after is not None and k + 1 >= stop_after:
            raise KeyboardInterrupt(f"stopped after {k + 1} trials (test hook)")


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
    manifest = read_manifest(layout.search)
    if not force and manifest and manifest.get("fingerprint") == fp:
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
    model = attach_adapters(load_base_model(cfg.model, device=device), adapter_dirs)
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
        for step, (frac, per) in enumerate(objective.staged(model, fractions)):
            trial.report(objective.combine(per), step)
            trial.set_user_attr("fraction_evaluated", frac)
            if frac < 1.0 and trial.should_prune():
                return None
        return {"per_dataset": per, "score": objective.combine(per)}

    study = open_study(cfg, fp)
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
        if cfg.search.export_merged:
            from ..base_model import DTYPES
            from ..lora import export_merged_model

            export_merged_model(cfg.model, tmp / "fused", tmp / "merged",
                                DTYPES[cfg.model.quantization.compute_dtype])
        write_manifest(tmp, stage="search", fingerprint=fp, config_hash=config_hash(cfg.search),
                       inputs={n: (read_manifest(adapter_dirs[n]) or {}).get("fingerprint", "")
                               for n in names},
                       seed=cfg.seed, metrics={"best_score": best["score"], "n_trials": len(trials)},
                       extra={"best_weights": best["weights"]})
    print(f"search: {len(trials)} trials ({pruned} pruned), best {best['weights']} -> {best['score']:.4f}")
    return result
