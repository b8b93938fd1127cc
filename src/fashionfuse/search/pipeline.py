"""`search_weights(cfg)`: find fusion weights on a held-out objective, export the fused adapter.

Check (fingerprint, adapters fusable), load (base model once, every adapter attached), build
(objective, study), run (the configured method), write (trials, best weights, plots, fused
adapter, optional merged model). A candidate only changes LoRA scales in memory.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from ..architectures import check_tokenizer_fits
from ..base_model import (
    DTYPES,
    base_fingerprint_parts,
    default_device,
    load_base_model,
    load_tokenizer,
)
from ..config import RunConfig, config_hash
from ..errors import UserError
from ..lora import (
    attach_adapters,
    export_merged_model,
    fuse_adapters,
    load_saved_adapter,
    save_peft_adapter,
)
from ..plots import pyplot, save_figure
from ..rundir import (
    RunLayout,
    artifact_id,
    atomic_dir,
    fingerprint,
    is_up_to_date,
    write_json,
    write_manifest,
)
from ..tracking import Tracker
from .objectives import build_objective
from .registry import search_method
from .study import SearchContext, finished, open_study

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "tokenizer.model")


class SearchError(UserError, RuntimeError):
    """The search cannot run (missing adapters, bad objective)."""


def search_fingerprint(cfg: RunConfig) -> str:
    """Everything the search result depends on: adapters and objective data (their contents),
    base model, search section, seed."""
    layout = RunLayout(cfg.run_dir)
    return fingerprint({
        "stage": "search", "search": cfg.search.model_dump(mode="json"), "seed": cfg.seed,
        "base": base_fingerprint_parts(cfg.model), "model": cfg.model.model_dump(mode="json"),
        "adapters": {n: artifact_id(layout.adapter(n)) for n in cfg.search_adapters},
        "curated": {n: artifact_id(layout.curated(n)) for n in cfg.objective_datasets},
    })


def _load_adapters(cfg: RunConfig) -> dict[str, Path]:
    """The searched adapters' directories, checked to exist and to be fusable exactly."""
    layout = RunLayout(cfg.run_dir)
    dirs = {n: layout.adapter(n) for n in cfg.search_adapters}
    missing = [str(p) for p in dirs.values() if not (p / "adapter_config.json").exists()]
    if missing:
        raise SearchError(f"adapters missing: {missing} (run `fashionfuse train-adapter` first)")
    fuse_adapters([load_saved_adapter(p) for p in dirs.values()], [1.0] * len(dirs))
    return dirs


def search_weights(cfg: RunConfig, force: bool = False, progress=None) -> dict:
    """Search fusion weights, then write trials, best weights, plots and the fused adapter.
    `progress` is called with the number of trials this worker finished."""
    layout = RunLayout(cfg.run_dir)
    fp = search_fingerprint(cfg)
    if not force and is_up_to_date(layout.search, fp):
        print("search: up to date")
        return json.loads((layout.search / "best.json").read_text())
    adapter_dirs = _load_adapters(cfg)
    device = default_device()
    tokenizer = load_tokenizer(cfg.model)
    base = load_base_model(cfg.model, device=device)
    check_tokenizer_fits(base, tokenizer)
    model = attach_adapters(base, adapter_dirs)
    ctx = SearchContext(cfg, open_study(cfg, fp, fresh=force), model,
                        build_objective(cfg, tokenizer, device), cfg.search_adapters, progress,
                        Tracker(cfg, "search", cfg.search.method))
    try:
        search_method(cfg.search.method).run(ctx)
    finally:
        ctx.tracker.close()
    if not force and is_up_to_date(layout.search, fp):
        print("search: another worker wrote the result")
        return json.loads((layout.search / "best.json").read_text())
    return _write_result(cfg, fp, ctx, adapter_dirs)


def _trials(ctx: SearchContext) -> list[dict]:
    return [{"number": t.number, "weights": {n: t.params[n] for n in ctx.names}, "score": t.value,
             "per_dataset": t.user_attrs.get("per_dataset"), "seconds": t.user_attrs.get("seconds")}
            for t in finished(ctx.study)]


def _write_result(cfg: RunConfig, fp: str, ctx: SearchContext, adapter_dirs: dict) -> dict:
    """Write trials, best weights, plots, the fused adapter (and merged model) atomically."""
    names, trials = ctx.names, _trials(ctx)
    best = min(trials, key=lambda t: t["score"])
    pruned = len(finished(ctx.study, pruned=True)) - len(trials)
    result = {"method": cfg.search.method, "objective": cfg.search.objective.type,
              "adapters": names, "best_weights": best["weights"], "best_score": best["score"],
              "best_per_dataset": best["per_dataset"], "n_trials": len(trials),
              "n_pruned": pruned}
    metrics = {"best_score": best["score"], "n_trials": len(trials)}
    with atomic_dir(RunLayout(cfg.run_dir).search) as tmp:
        write_json(tmp / "trials.json", trials)
        _write_csv(trials, names, tmp / "trials.csv")
        write_json(tmp / "best.json", result)
        config, tensors = fuse_adapters([load_saved_adapter(adapter_dirs[n]) for n in names],
                                        [best["weights"][n] for n in names])
        save_peft_adapter(tmp / "fused", config, tensors)
        for f in TOKENIZER_FILES:
            if (adapter_dirs[names[0]] / f).exists():
                shutil.copy(adapter_dirs[names[0]] / f, tmp / "fused" / f)
        _plots(trials, names, tmp / "search.png")
        if cfg.search.export_merged:
            report = export_merged_model(cfg.model, tmp / "fused", tmp / "merged",
                                         DTYPES.get(cfg.search.export_dtype))
            metrics["merged_update_relative_error"] = report["update_relative_error"]
            metrics["merged_dtype"] = report["dtype"]
        write_manifest(tmp, stage="search", fingerprint=fp, config_hash=config_hash(cfg.search),
                       inputs={n: artifact_id(adapter_dirs[n]) for n in names},
                       seed=cfg.seed, metrics=metrics, extra={"best_weights": best["weights"]},
                       content=["fused/adapter_model.safetensors", "fused/adapter_config.json"])
    print(f"search: {len(trials)} trials ({pruned} pruned), best {best['weights']} -> "
          f"{best['score']:.4f}")
    return result


def _write_csv(trials: list[dict], names: list[str], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["number", *[f"w_{n}" for n in names], "score", "seconds"])
        for t in trials:
            w.writerow([t["number"], *[t["weights"][n] for n in names], t["score"], t["seconds"]])


def _plots(trials: list[dict], names: list[str], out: Path) -> None:
    """Score against each weight, and the best score so far."""
    fig, axes = pyplot().subplots(1, len(names) + 1, figsize=(3.2 * (len(names) + 1), 3))
    scores = [t["score"] for t in trials]
    for ax, n in zip(axes, names):
        ax.scatter([t["weights"][n] for t in trials], scores, s=12)
        ax.set_xlabel(f"w[{n}]")
        ax.set_ylabel("objective")
    best = [min(scores[: i + 1]) for i in range(len(scores))]
    axes[-1].plot(range(1, len(best) + 1), best)
    axes[-1].set_xlabel("trials")
    axes[-1].set_ylabel("best objective")
    save_figure(fig, out)
