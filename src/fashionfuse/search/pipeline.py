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
from ..adapters.model_card import portable_base, record_base, write_model_card
from ..adapters.runtime import attach_adapters, lora_layers
from ..adapters.saved import check_fusable, load_saved_adapter
from ..adapters.weight_keys import granularity_of, weight_names
from ..base_model import (
    DTYPES,
    base_fingerprint_parts,
    scoring_dtype,
    load_base_model,
    load_tokenizer,
)
from ..config import RunConfig, config_hash
from ..errors import UserError
from ..fusion import OPERATOR_PARAMS, is_dense
from ..fusion.export import export_merged_model, trained_quantization, write_fused
from ..fusion.resident import ResidentFusion
from ..plots import pyplot, save_figure
from ..train.distributed import barrier, init_world
from ..rundir import (
    RunLayout,
    artifact_id,
    atomic_dir,
    file_digest,
    fingerprint,
    is_up_to_date,
    read_manifest,
    without_unset,
    write_json,
    write_manifest,
)
from ..tracking import Tracker
from .objectives import build_objective
from .registry import BUILTIN_METHODS, search_method
from .study import SearchContext, finished, open_study

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "tokenizer.model")


class SearchError(UserError, RuntimeError):
    """The search cannot run (missing adapters, bad objective)."""


# settings that change how a search runs but not its result
OPERATIONAL = {"storage", "stale_after_s"}


def search_settings(cfg: RunConfig) -> dict:
    """The search section as far as this search's result depends on it: the common settings
    and the method's own (each built-in method names the settings it reads in SETTINGS; a
    plugin method without SETTINGS keeps them all), so a grid search is not redone when only
    `gradient_steps` changed."""
    method_only = {s for name in BUILTIN_METHODS for s in search_method(name).SETTINGS}
    own = set(getattr(search_method(cfg.search.method), "SETTINGS", method_only))
    settings = without_unset(cfg.search.model_dump(mode="json"), ("operator_params",))
    settings["objective"] = without_unset(settings["objective"], ("retention",))
    return {k: v for k, v in settings.items()
            if k not in OPERATIONAL and (k not in method_only or k in own)}


def search_fingerprint(cfg: RunConfig) -> str:
    """Everything the search result depends on: adapters and objective data (their contents),
    base model, search section (and the layer weights it refines), seed."""
    layout = RunLayout(cfg.run_dir)
    refined = cfg.search.layer_weights_from
    return fingerprint({
        "layer_weights": (file_digest(Path(refined)) if Path(refined).is_file() else "absent")
        if refined else None,
        "stage": "search", "search": search_settings(cfg), "seed": cfg.seed,
        "base": base_fingerprint_parts(cfg.model), "model": cfg.model.model_dump(mode="json"),
        "compute_dtype": scoring_dtype(cfg.model, [layout.adapter(n) for n in cfg.search_adapters]),
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
    check_fusable([load_saved_adapter(p) for p in dirs.values()])
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
    world = init_world()  # under a launcher: each rank a search worker on its own device
    device = world.device
    tokenizer = load_tokenizer(cfg.model)
    base = load_base_model(cfg.model, device=device,
                           weight_dtype=scoring_dtype(cfg.model, adapter_dirs.values(), device))
    check_tokenizer_fits(base, tokenizer)
    model = attach_adapters(base, adapter_dirs)
    fusion = ResidentFusion(model, cfg.search_adapters, operator_name=cfg.search.operator,
                            granularity=cfg.search.granularity,
                            density=cfg.search.densities[0], seed=cfg.seed,
                            operator_params=cfg.search.fixed_operator_params(),
                            fixed_weights=_layer_weights(cfg, model))
    study, storage = open_study(cfg, fp, fresh=force)
    ctx = SearchContext(cfg, study, model, build_objective(cfg, tokenizer, device),
                        cfg.search_adapters, progress, Tracker(cfg, "search", cfg.search.method),
                        fusion, storage=storage)
    try:
        ctx.method.run(ctx)
    finally:
        ctx.tracker.close()
        fusion.close()
    if world.size > 1:  # the ranks of one launched job: rank 0 writes, the others read
        if world.is_main:
            result = _write_result(cfg, fp, ctx, adapter_dirs)
        barrier(world)
        return result if world.is_main else json.loads((layout.search / "best.json").read_text())
    if not force and is_up_to_date(layout.search, fp):
        print("search: another worker wrote the result")
        return json.loads((layout.search / "best.json").read_text())
    return _write_result(cfg, fp, ctx, adapter_dirs)


def _layer_weights(cfg: RunConfig, model) -> dict[str, float]:
    """The learned layer weights `search.layer_weights_from` names (checked complete for this
    model, adapters and granularity); empty when it names none."""
    path = cfg.search.layer_weights_from
    if not path:
        return {}
    try:
        weights = json.loads(Path(path).read_text())["best_weights"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"search.layer_weights_from: {path}: not a readable best.json "
                        f"({type(exc).__name__})") from None
    fixed = {k: float(v) for k, v in weights.items() if "@" in k}
    found = granularity_of(fixed)
    if found != cfg.search.granularity:
        raise UserError(f"search.layer_weights_from: {path} holds {found}-level weights, but "
                        f"search.granularity is {cfg.search.granularity}")
    need = weight_names(cfg.search_adapters, list(lora_layers(model)), found)
    missing = [k for k in need if k not in fixed]
    if missing:
        raise UserError(f"search.layer_weights_from: {path} lacks weights {missing[:3]} "
                        f"(learned for other adapters or another model?)")
    return {k: fixed[k] for k in need}


def _trials(ctx: SearchContext) -> list[dict]:
    """Finished trials: weights (with the fixed layer weights a refinement searched on top
    of), operator parameters, score, per-dataset scores, seconds."""
    out = []
    for t in finished(ctx.study):
        params = {n: t.params[n] for n in ctx.param_names}
        # stored as the lattice point they are (optuna's draws carry float noise: a step of
        # 0.05 gives 0.35000000000000003); 10 decimals change no float32 scale
        weights = {k: round(float(v), 10) for k, v in ctx.fusion.weights(params).items()}
        row = {"number": t.number, "weights": weights, "score": t.value,
               "per_dataset": t.user_attrs.get("per_dataset"), "seconds": t.user_attrs.get("seconds")}
        if is_dense(ctx.cfg.search.operator):
            row["density"] = float(params.get("density", ctx.fusion.density))
            row |= {k: float(params.get(k, v)) for k, v in ctx.fusion.operator_params.items()}
            row["merge_seconds"] = t.user_attrs.get("merge_seconds")
        out.append(row)
    return out


def _write_result(cfg: RunConfig, fp: str, ctx: SearchContext, adapter_dirs: dict) -> dict:
    """Write trials, best weights, plots, the fused adapter (and merged model) atomically."""
    names, trials, s = ctx.names, _trials(ctx), cfg.search
    best = min(trials, key=lambda t: t["score"])
    pruned = len(finished(ctx.study, pruned=True)) - len(trials)
    result = {"method": s.method, "objective": s.objective.type, "operator": s.operator,
              "granularity": s.granularity, "adapters": names, "best_weights": best["weights"],
              "best_score": best["score"], "best_per_dataset": best["per_dataset"],
              "n_trials": len(trials), "n_pruned": pruned, "seed": cfg.seed}
    if is_dense(s.operator):
        result["best_density"] = best["density"]
        result |= {f"best_{k}": best[k] for k in s.fixed_operator_params()}
    metrics = {"best_score": best["score"], "n_trials": len(trials)}
    with atomic_dir(RunLayout(cfg.run_dir).search) as tmp:
        write_json(tmp / "trials.json", trials)
        _write_csv(trials, ctx.weight_names, tmp / "trials.csv")
        write_json(tmp / "best.json", result)
        report, deltas = write_fused(
            tmp / "fused", [load_saved_adapter(adapter_dirs[n]) for n in names], names,
            best["weights"], granularity=s.granularity, operator_name=s.operator,
            density=best.get("density", s.densities[0]), seed=cfg.seed, svd_rank=s.svd_rank,
            params={k: best.get(k, v) for k, v in s.fixed_operator_params().items()})
        if not report["exact"]:
            metrics["svd_relative_error"] = report["relative_error"]
        for f in TOKENIZER_FILES:
            if (adapter_dirs[names[0]] / f).exists():
                shutil.copy(adapter_dirs[names[0]] / f, tmp / "fused" / f)
        record_base(tmp / "fused", cfg.model)
        _fused_card(cfg, tmp / "fused", result, report)
        _plots(trials, names, tmp / "search.png")
        if s.export_merged:
            _export_merged(cfg, fp, tmp, adapter_dirs, names, deltas, metrics)
        write_manifest(tmp, stage="search", fingerprint=fp, config_hash=config_hash(s),
                       inputs={n: artifact_id(adapter_dirs[n]) for n in names},
                       seed=cfg.seed, metrics=metrics, extra={"best_weights": best["weights"]},
                       content=["fused/adapter_model.safetensors", "fused/adapter_config.json"])
    print(f"search: {len(trials)} trials ({pruned} pruned), best {_short(best['weights'])} -> "
          f"{best['score']:.4f}")
    return result


def _fused_card(cfg: RunConfig, out: Path, result: dict, report: dict) -> None:
    """The fused adapter's model card: its adapters, weights and searched score."""
    weights = ", ".join(f"{k} {v:.4g}" for k, v in result["best_weights"].items())
    how = ("the exact weighted sum of the adapters' deltas (their LoRA factors concatenated, "
           f"rank {report.get('rank')})" if report.get("exact") else
           f"the {report['operator']} merge of their deltas, as a rank-{report.get('rank')} "
           f"SVD adapter (relative error {report.get('relative_error', 0):.1%})")
    write_model_card(
        out, RunLayout(cfg.run_dir).fused, title="fashionfuse fused adapter",
        base=portable_base(cfg.model),
        summary=[f"Fusion of the adapters {', '.join(result['adapters'])}: {how}, with the "
                 f"weights found by {result['method']} search on the {result['objective']} "
                 f"objective ({result['n_trials']} trials)."],
        table={"base model": portable_base(cfg.model), "weights": weights,
               "granularity": result["granularity"], "objective": result["objective"],
               "best score (lower is better)": f"{result['best_score']:.6g}",
               **{f"score on {d}": f"{v:.6g}" for d, v in (result["best_per_dataset"] or {}).items()
                  if isinstance(v, (int, float))}})


def _export_merged(cfg: RunConfig, fp: str, tmp: Path, adapter_dirs: dict, names: list[str],
                   deltas, metrics: dict) -> None:
    """Save base + fused adapter as one model in `merged/`, re-quantising a 4-bit base exactly
    as the adapters were trained on it; its own manifest hashes every file, so what eval scores
    is fingerprinted by its bytes."""
    quantization = None
    if cfg.model.quantization.bits == 4:
        quantization = trained_quantization({n: read_manifest(adapter_dirs[n]) for n in names})
    report = export_merged_model(cfg.model, tmp / "fused", tmp / "merged",
                                 DTYPES.get(cfg.search.export_dtype), deltas=deltas,
                                 quantization=quantization)
    metrics["merged_update_relative_error"] = report["update_relative_error"]
    metrics["merged_dtype"] = report["dtype"]
    merged = tmp / "merged"
    write_manifest(merged, stage="search.merged", fingerprint=fp,
                   config_hash=config_hash(cfg.search), inputs={"fused": "fused"},
                   seed=cfg.seed, metrics={k: v for k, v in report.items() if k != "per_module"},
                   content=sorted(str(p.relative_to(merged)) for p in merged.rglob("*")
                                  if p.is_file()))


def _short(weights: dict[str, float], most: int = 6) -> str:
    items = list(weights.items())
    text = ", ".join(f"{k}: {v:g}" for k, v in items[:most])
    return "{" + text + (f", ... ({len(items)} weights)" if len(items) > most else "") + "}"


def _write_csv(trials: list[dict], names: list[str], path: Path) -> None:
    extra = [k for k in ("density", *OPERATOR_PARAMS) if trials and k in trials[0]]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["number", *[f"w_{n}" for n in names], *extra, "score", "seconds"])
        for t in trials:
            w.writerow([t["number"], *[t["weights"].get(n) for n in names],
                        *[t[k] for k in extra], t["score"], t["seconds"]])


def _plots(trials: list[dict], names: list[str], out: Path) -> None:
    """Score against each adapter's weight (or, for layer-wise weights, the best trial's
    weights across blocks), and the best score so far."""
    layered = any("@" in k for k in trials[0]["weights"])
    panels = 1 if layered else len(names)
    fig, axes = pyplot().subplots(1, panels + 1, figsize=(3.2 * (panels + 1), 3))
    scores = [t["score"] for t in trials]
    if layered:
        best = min(trials, key=lambda t: t["score"])["weights"]
        for n in names:
            keys = [k for k in best if k.startswith(f"{n}@")]
            axes[0].plot(range(len(keys)), [best[k] * best.get(n, 1.0) for k in keys],
                         marker=".", label=n)
        axes[0].set_xlabel("block (and projection), in order")
        axes[0].set_ylabel("best weight")
        axes[0].legend(fontsize=7)
    else:
        for ax, n in zip(axes, names):
            ax.scatter([t["weights"][n] for t in trials], scores, s=12)
            ax.set_xlabel(f"w[{n}]")
            ax.set_ylabel("objective")
    best_so_far = [min(scores[: i + 1]) for i in range(len(scores))]
    axes[-1].plot(range(1, len(best_so_far) + 1), best_so_far)
    axes[-1].set_xlabel("trials")
    axes[-1].set_ylabel("best objective")
    save_figure(fig, out)
