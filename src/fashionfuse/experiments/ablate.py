"""`ablate(cfg)`: the paper's comparison (Tables 7 and 8) on the user's own data, in one command.

From one config it builds, reusing every artifact already built, and scores with one eval:

    V0.1  one adapter per dataset                  adapters/<dataset>          (the run's own)
    V0.2  one adapter on all datasets together     adapters/ablate-all-datasets
          the same, equal token shares per dataset adapters/ablate-mix-balanced
          the same, token shares ~ searched weights  adapters/ablate-mix-ratio   (after the search)
          the same, token shares searched          adapters/ablate-mix-search-<shares> (asked
          (the fusion search's method and budget,                                 for by name
          one adapter per mix, best kept)                                         only)
    V0.4  sequential fine-tuning, in dataset order adapters/ablate-seq-<k>     (each beside the
          (a, then b on top, then c on top)                                      frozen previous)
    V0.5  fusion with every weight 1               ablate/weights-one/search/fused
          fusion with uniform weights 1/n          ablate/uniform/search/fused
    V1    fusion with searched weights             search/fused                (the run's own)
          fusion with gradient-learned weights     ablate/gradient/search/fused
          layer-wise learned weights               ablate/layerwise/search/fused
          those x a per-adapter grid multiplier    ablate/layerwise-refined/search/fused
          TIES / DARE / magnitude / DELLA /        ablate/<operator>/search/best.json (exact: the
          Breadcrumbs / KnOTS-TIES / KnOTS-DARE    merged deltas on the base, as searched) and
          merges, searched                         ablate/<operator>/search/fused (SVD export)
          routing: PEFT's Arrow over the           ablate/arrow/router.json
          per-dataset adapters (per token)
          merge-ready fusion: the per-dataset      adapters/ablate-merge-ready-<dataset>,
          adapters trained with one shared frozen  ablate/merge-ready/search/fused (rank r)
          A (training.lora.shared_a), fused by the
          same search

The fixed-weight fusions are one-candidate grid searches, so they are fingerprinted, cached and
scored on the validation data like the search. Each variant's run dir under `ablate/` links the
parent's `curate/` and `adapters/`. Output: `ablate/eval/` (lm-eval results per variant) and
`ablate/table.{md,csv,json,png}`: per task and average, best marked, and each variant's average
minus the best single adapter's, led by the verdict (`verdict.py`: the paper's comparisons with
paired-bootstrap intervals). With `ablate.seeds` all of it is built once per training seed
(`seeds.py`) and the table is their mean and spread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig
from ..errors import UserError
from ..evaluate.table import plot_table, to_csv, to_markdown
from ..fusion import OPERATORS, is_dense, searched_operator_params
from .mix_search import (candidate_specs, normalised, search_mix, shares_label,
                         unsupported_method)
from ..rundir import RunLayout, link_shared, write_json, write_text

ALL_DATA = "ablate-all-datasets"
MERGE_READY = "ablate-merge-ready-"  # + the dataset's name
MIX_BALANCED, MIX_RATIO = "ablate-mix-balanced", "ablate-mix-ratio"
# per-adapter multipliers tried on learned layer weights: the learned point itself (all 1) is a
# candidate, so the refinement can only improve on it
REFINE_MULTIPLIERS = [0.5, 1.0, 1.5]
# the dense-operator variants, in table order, with their labels
DENSE_LABELS = {"ties": "TIES", "dare": "DARE", "magnitude": "magnitude", "della": "DELLA",
                "breadcrumbs": "Breadcrumbs", "knots_ties": "KnOTS-TIES",
                "knots_dare": "KnOTS-DARE"}
_PLAIN_SUM = {"operator": "sum", "granularity": "adapter", "layer_weights_from": None}


def sequential_chain(cfg: RunConfig) -> list[str]:
    """Adapter names of the sequential variant, in training order (the last is the variant)."""
    order = cfg.ablate.sequential_order or [d.name for d in cfg.datasets]
    return [order[0]] + [f"ablate-seq-{k}" for k in range(2, len(order) + 1)]


def ablation_config(cfg: RunConfig) -> RunConfig:
    """The run's config with the baseline adapters added (all datasets in one adapter; the
    sequential chain, each link trained on the next dataset beside the previous link)."""
    names = [d.name for d in cfg.datasets]
    order = cfg.ablate.sequential_order or names
    extra = []
    if "fused_dataset" in cfg.ablate.variants:
        extra.append({"name": ALL_DATA, "datasets": names})
    if "mixed_balanced" in cfg.ablate.variants:
        extra.append({"name": MIX_BALANCED, "datasets": names, "mix": {n: 1.0 for n in names}})
    if "mixed_searched" in cfg.ablate.variants:
        extra += candidate_specs(cfg)
    ratio = searched_mix(cfg) if "mixed_ratio" in cfg.ablate.variants else None
    if ratio is not None:
        extra.append({"name": MIX_RATIO, "datasets": names, "mix": ratio})
    if "sequential" in cfg.ablate.variants:
        chain = sequential_chain(cfg)
        extra += [{"name": link, "datasets": [dataset], "on_top_of": [previous]}
                  for previous, link, dataset in zip(chain, chain[1:], order[1:])]
    if "merge_ready" in cfg.ablate.variants:
        extra += [{"name": merge_ready_name(cfg, a), "datasets": cfg.adapter_spec(a).datasets,
                   "shared_a": True} for a in cfg.search_adapters]
    return cfg.with_adapters(extra)


def merge_ready_name(cfg: RunConfig, adapter: str) -> str:
    """The merge-ready twin of a searched adapter (the same datasets, a shared frozen A)."""
    return MERGE_READY + "-".join(cfg.adapter_spec(adapter).datasets)


def searched_mix(cfg: RunConfig) -> dict[str, float] | None:
    """Token shares proportional to the run's searched fusion weights (an adapter's mean weight
    over its blocks for a layer-wise search; negative weights count as 0), normalised; None
    before the search has run."""
    best = RunLayout(cfg.run_dir).search / "best.json"
    if not best.is_file():
        return None
    weights = json.loads(best.read_text())["best_weights"]
    shares = normalised({cfg.adapter_spec(a).datasets[0]: w
                         for a, w in adapter_mean_weights(weights, cfg.search_adapters).items()})
    if shares is None:
        raise UserError(f"ablate: mixed_ratio: every searched weight in {best} is 0 or less, "
                        "so there is no mix to train; drop mixed_ratio from ablate.variants")
    return {d: shares.get(d, 0.0) for d in (x.name for x in cfg.datasets)}


def adapter_mean_weights(weights: dict[str, float], adapters: list[str]) -> dict[str, float]:
    """Each adapter's weight: its own, or for layer-wise weights (`<adapter>@<block>`, times a
    per-adapter multiplier where one was searched) their mean over the blocks."""
    out = {}
    for a in adapters:
        groups = [float(v) for k, v in weights.items() if k.startswith(f"{a}@")]
        scale = float(weights.get(a, 1.0))
        out[a] = scale * sum(groups) / len(groups) if groups else scale
    return out


def check_mixed_ratio(cfg: RunConfig, variant: str = "mixed_ratio") -> str | None:
    """Why the mixed_ratio (or mixed_searched) variant cannot run with this config (None: it
    can): its shares map the searched single-dataset adapters' weights to their datasets."""
    multi = [a for a in cfg.search_adapters if len(cfg.adapter_spec(a).datasets) != 1]
    if multi:
        return f"{variant} (searched adapters {multi} learn several datasets)"
    return None


def variant_config(cfg: RunConfig, name: str, **search) -> RunConfig:
    """A config whose run dir `ablate/<name>` shares the parent's curated data and adapters
    (links) and searches with `search` settings instead."""
    root = link_shared(cfg.run_dir, RunLayout(cfg.run_dir).ablation(name), ("curate", "adapters"))
    return _with_search(cfg, str(root), search)


def _with_search(cfg: RunConfig, run_dir: str, search: dict) -> RunConfig:
    data = cfg.model_dump(mode="json")
    data["run_dir"] = run_dir
    data["search"].update(search)
    return RunConfig.model_validate(data)


@dataclass(frozen=True)
class FusionVariant:
    """One fusion row of the ablation: its run dir `ablate/<folder>` (None: the run's own
    search), its table label (dense operators add density and SVD error once searched), the
    search settings it overrides, and whether it is a row of its own (the layer-wise search
    also feeds the refined variant)."""

    folder: str | None
    label: str
    search: dict = field(default_factory=dict)
    in_table: bool = True
    extra_adapters: bool = False  # searches the ablation's own adapters (merge_ready)


def fusion_variants(cfg: RunConfig) -> list[FusionVariant]:
    """The configured fusion variants, in table order. Variants that learn weights by gradient
    need a differentiable objective: when `search.objective` is not one (lm_eval, mix), they
    learn on the validation loss of the same datasets, and their label says so."""
    from ..search import registry

    variants, n = cfg.ablate.variants, len(cfg.search_adapters)
    plain = {"halving_fractions": None, "export_merged": False}
    learned = dict(plain, method="gradient", operator="sum", layer_weights_from=None)
    on = ""
    if not registry.objective_class(cfg.search.objective.type).differentiable:
        # validation loss has no retention term: it is dropped, and the label says so
        learned["objective"] = dict(cfg.search.objective.model_dump(mode="json"), type="val_loss",
                                    retention=None)
        on = " on validation loss" + (", no retention term" if cfg.search.objective.retention
                                      else "")
    out = [FusionVariant(folder, label, dict(plain, **_PLAIN_SUM, method="grid",
                                             grid_values=[weight]))
           for key, folder, label, weight in (
               ("weights_one", "weights-one", "V0.5 fusion, weights 1", 1.0),
               ("uniform", "uniform", f"fusion, uniform 1/{n}", round(1.0 / n, 6)))
           if key in variants]
    if "searched" in variants:
        out.append(FusionVariant(None, f"V1 fusion, searched ({cfg.search.method})"))
    if "gradient" in variants:
        out.append(FusionVariant("gradient", f"fusion, learned (gradient{on})",
                                 dict(learned, granularity="adapter")))
    if "layerwise" in variants or "layerwise_refined" in variants:
        out.append(FusionVariant("layerwise", f"fusion, layer-wise learned (gradient{on})",
                                 dict(learned, granularity="layer"), "layerwise" in variants))
    if "layerwise_refined" in variants:
        best = RunLayout(cfg.run_dir).ablation("layerwise") / "search" / "best.json"
        out.append(FusionVariant("layerwise-refined", "fusion, layer-wise x grid multiplier",
                                 dict(plain, method="grid", granularity="layer", operator="sum",
                                      layer_weights_from=str(best),
                                      grid_values=REFINE_MULTIPLIERS)))
    if "merge_ready" in variants:
        out.append(FusionVariant(
            "merge-ready", f"fusion, merge-ready (shared A), searched ({cfg.search.method})",
            dict(plain, adapters=[merge_ready_name(cfg, a) for a in cfg.search_adapters]),
            extra_adapters=True))
    method = "grid" if cfg.search.method == "gradient" else cfg.search.method
    out += [FusionVariant(op, label,
                          dict(plain, method=method, operator=op, granularity="adapter",
                               layer_weights_from=None,
                               operator_params={k: v for k, v in cfg.search.operator_params.items()
                                                if k in OPERATORS[op].params}))
            for op, label in DENSE_LABELS.items() if op in variants]
    return out


def check_fusion_variants(cfg: RunConfig, planned: list[FusionVariant]) -> None:
    """Validate every fusion variant's config before any work, so a variant that cannot run
    fails at once instead of after hours of training and searching; the error names the
    variants to drop from `ablate.variants`."""
    from pydantic import ValidationError

    from ..search import registry

    bad = []
    for v in planned:
        try:
            base = ablation_config(cfg) if v.extra_adapters else cfg
            vcfg = _with_search(base, cfg.run_dir, v.search) if v.search else cfg
        except ValidationError as e:
            bad.append(f"{v.folder or 'searched'} ({e.errors()[0]['msg']})")
            continue
        objective = registry.objective_class(vcfg.search.objective.type)
        if vcfg.search.method == "gradient" and not objective.differentiable:
            bad.append(f"{v.folder or 'searched'} (method gradient needs a differentiable "
                       f"objective, not {vcfg.search.objective.type})")
    for variant in ("mixed_ratio", "mixed_searched"):
        why = check_mixed_ratio(cfg, variant) if variant in cfg.ablate.variants else None
        if why:
            bad.append(why)
    if "mixed_searched" in cfg.ablate.variants and unsupported_method(cfg):
        bad.append(unsupported_method(cfg))
    if bad:
        raise UserError(f"ablate: these variants cannot run with this config: {'; '.join(bad)}; "
                        "drop them from ablate.variants")


def _fusions(cfg: RunConfig, planned: list[FusionVariant], force: bool) -> dict[str, Path]:
    """Run the fusion variants' searches; label -> fused adapter directory."""
    from ..search import search_weights

    out = {}
    for v in planned:
        base = ablation_config(cfg) if v.extra_adapters else cfg
        vcfg = variant_config(base, v.folder, **v.search) if v.folder else cfg
        best = search_weights(vcfg, force=force)
        fused = RunLayout(vcfg.run_dir).fused
        if not v.in_table:
            continue
        if not is_dense(v.search.get("operator", "sum")):
            out[v.label] = fused
            continue
        # a dense merge: scored exactly (the merged deltas on the resident base, as the search
        # scored it), with its exported SVD adapter beside it
        svd = json.loads((fused / "svd_report.json").read_text())
        params = "".join(f", {k} {value:g}" for k, value in searched_operator_params(best).items())
        head = f"fusion, {v.label} ({v.search['method']}{params}"
        out[f"{head}; exact merge)"] = RunLayout(vcfg.run_dir).search / "best.json"
        out[f"{head}; SVD rank {svd['rank']}, error {100 * svd['relative_error']:.1f}%)"] = fused
    return out


def build_variants(cfg: RunConfig, force: bool = False) -> dict[str, Path | None]:
    """Curate, train and fuse whatever the configured variants need (skipping what is up to
    date); returns label -> adapter directory (None: the base model), in table order."""
    from ..curate import curate
    from ..train import train_adapters
    from ..train.distributed import on_main_first

    if cfg.rounds:
        raise UserError("ablate: compares the variants of one fusion; remove `rounds` from the "
                        "config (or ablate each round's config)")
    planned = fusion_variants(cfg)
    check_fusion_variants(cfg, planned)
    acfg = ablation_config(cfg)
    layout = RunLayout(cfg.run_dir)
    on_main_first(lambda again: curate(acfg, force=again), force)
    datasets, variants = [d.name for d in cfg.datasets], cfg.ablate.variants
    needed = list(datasets)
    for key, name in (("fused_dataset", ALL_DATA), ("mixed_balanced", MIX_BALANCED)):
        if key in variants:
            needed.append(name)
    if "sequential" in variants:
        needed += sequential_chain(cfg)[1:]
    if "merge_ready" in variants:
        needed += [merge_ready_name(cfg, a) for a in cfg.search_adapters]
    train_adapters(acfg, needed, force=force)
    models: dict[str, Path | None] = {"base": None}
    if "per_dataset" in variants:
        models.update({f"V0.1 adapter:{d}": layout.adapter(d) for d in datasets})
    if "fused_dataset" in variants:
        models["V0.2 one adapter, all datasets"] = layout.adapter(ALL_DATA)
    if "mixed_balanced" in variants:
        models["one adapter, balanced mix (equal tokens)"] = layout.adapter(MIX_BALANCED)
    if "mixed_ratio" in variants:
        models[_MIX_RATIO_SLOT] = None  # placed here, trained after the search
    if "mixed_searched" in variants:
        label, name = search_mix(cfg, acfg, force)
        models[label] = layout.adapter(name)
    if "sequential" in variants:
        order = cfg.ablate.sequential_order or datasets
        models[f"V0.4 sequential ({' -> '.join(order)})"] = layout.adapter(sequential_chain(cfg)[-1])
    models.update(_fusions(cfg, planned, force))
    if "arrow" in variants:
        from ..adapters.routing import write_router

        a = cfg.ablate
        router = write_router(layout.ablation("arrow"), [layout.adapter(d) for d in datasets],
                              a.arrow_top_k, a.arrow_temperature, cfg.seed)
        models[f"routing, Arrow (top {min(a.arrow_top_k, len(datasets))} of "
               f"{len(datasets)} adapters per token)"] = router
    if "mixed_ratio" in variants:
        label, path = _mixed_ratio(cfg, force)
        models = {label if k == _MIX_RATIO_SLOT else k: path if k == _MIX_RATIO_SLOT else v
                  for k, v in models.items()}
    return models


_MIX_RATIO_SLOT = "<mixed ratio>"


def _mixed_ratio(cfg: RunConfig, force: bool) -> tuple[str, Path]:
    """Train the adapter whose data mix follows the run's searched weights (running the
    search first if the searched variant did not); its table label and directory."""
    from ..search import search_weights
    from ..train import train_adapters

    searched = "searched" in cfg.ablate.variants  # then _fusions ran (or forced) it already
    if not (RunLayout(cfg.run_dir).search / "best.json").is_file() or (force and not searched):
        search_weights(cfg, force=force and not searched)
    acfg = ablation_config(cfg)
    train_adapters(acfg, [MIX_RATIO], force=force)
    label = f"one adapter, mix by searched weights ({shares_label(acfg.adapter_spec(MIX_RATIO).mix)})"
    return label, RunLayout(cfg.run_dir).adapter(MIX_RATIO)


def comparison(table: dict, singles: list[str]) -> dict:
    """The eval table with each row's average minus the best single adapter's (`vs_best_single`,
    in points) and that best single adapter named."""
    rows = {r["model"]: r for r in table["rows"]}
    best_single = max(singles, key=lambda m: rows[m]["average"] or 0.0) if singles else None
    ref = rows[best_single]["average"] if best_single else None
    out = dict(table, best_single=best_single)
    out["rows"] = [dict(r, vs_best_single=None if ref is None or r["average"] is None
                        else round(r["average"] - ref, 2)) for r in table["rows"]]
    return out


def _markdown(table: dict) -> str:
    lines = to_markdown(table).rstrip("\n").split("\n")
    lines[0] += " vs best single |"
    lines[1] += "---:|"
    for i, r in enumerate(table["rows"], start=2):
        d = r["vs_best_single"]
        lines[i] += f" {'' if d is None else f'{d:+.2f}'} |"
    note = (f"\nvs best single: average minus the best single adapter's "
            f"({table['best_single']}), in points.\n" if table["best_single"] else "\n")
    return "\n".join(lines) + "\n" + note


def _ablate_one(cfg: RunConfig, force: bool) -> tuple[dict, dict, list]:
    """One seed's ablation: (its table with `vs_best_single`, per-item values by label, the
    eval's task specs)."""
    from ..evaluate import evaluate
    from ..evaluate.harness import task_specs
    from ..train.distributed import is_main_process
    from .verdict import load_items

    models = build_variants(cfg, force)
    out = RunLayout(cfg.run_dir).ablation("eval")
    acfg = ablation_config(cfg)
    table = evaluate(acfg, force=force, models=models, out=out)
    if not is_main_process():  # under a launcher rank 0 gathers the scores and writes
        return {}, {}, []
    table = comparison(table, [m for m in models if m.startswith("V0.1 ")])
    return table, load_items(out, list(models)), task_specs(acfg)


def ablate(cfg: RunConfig, force: bool = False) -> dict:
    """Build and score every configured variant with the same eval (once per `ablate.seeds`
    entry); write the comparison with its verdict."""
    from ..train.distributed import is_main_process
    from .seeds import combine_tables, seed_configs
    from .verdict import verdict_markdown, verdicts

    runs = [_ablate_one(c, force) for c in seed_configs(cfg)]
    if not is_main_process():
        return {}
    if len(runs) == 1:
        table, items, specs = runs[0]
    else:
        tables = [t for t, _, _ in runs]
        table = comparison(combine_tables(tables, list(cfg.ablate.seeds)),
                           [r["model"] for r in tables[0]["rows"] if r["model"].startswith("V0.1 ")])
        specs = runs[0][2]
        items = {row["model"]: [its.get(t["rows"][k]["model"], {}) for t, its, _ in runs]
                 for k, row in enumerate(table["rows"])}
    table["verdict"] = verdicts(table, items, specs, cfg.seed)
    root = RunLayout(cfg.run_dir).ablation()
    markdown = verdict_markdown(table["verdict"]) + _markdown(table)
    write_json(root / "table.json", table)
    write_text(root / "table.md", markdown)
    write_text(root / "table.csv", to_csv(table))
    plot_table(dict(table, columns=[c for c in table["columns"] if not c.endswith(" sd")]),
               root / "table.png")
    print(markdown)
    print(f"ablate: table in {root / 'table.md'}")
    return table
