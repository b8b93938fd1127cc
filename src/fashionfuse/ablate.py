"""`ablate(cfg)`: the paper's comparison (Tables 7 and 8) on the user's own data, in one command.

From one config it builds, reusing every artifact already built, and scores with one eval:

    V0.1  one adapter per dataset                  adapters/<dataset>          (the run's own)
    V0.2  one adapter on all datasets together     adapters/ablate-all-datasets
    V0.4  sequential fine-tuning, in dataset order adapters/ablate-seq-<k>     (each beside the
          (a, then b on top, then c on top)                                      frozen previous)
    V0.5  fusion with every weight 1               ablate/weights-one/search/fused
          fusion with uniform weights 1/n          ablate/uniform/search/fused
    V1    fusion with searched weights             search/fused                (the run's own)
          fusion with gradient-learned weights     ablate/gradient/search/fused
          layer-wise learned weights               ablate/layerwise/search/fused
          those x a per-adapter grid multiplier    ablate/layerwise-refined/search/fused
          TIES / DARE / magnitude merges, searched ablate/<operator>/search/fused (SVD export)

The fixed-weight fusions are one-candidate grid searches, so they are fingerprinted, cached and
scored on the validation data like the search. Each variant's run dir under `ablate/` links the
parent's `curate/` and `adapters/`. Output: `ablate/eval/` (lm-eval results per variant) and
`ablate/table.{md,csv,json,png}`: per task and average, best marked, and each variant's average
minus the best single adapter's.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import RunConfig
from .errors import UserError
from .evaluate.table import plot_table, to_csv, to_markdown
from .rundir import RunLayout, link_shared, write_json, write_text

ALL_DATA = "ablate-all-datasets"
# per-adapter multipliers tried on learned layer weights: the learned point itself (all 1) is a
# candidate, so the refinement can only improve on it
REFINE_MULTIPLIERS = [0.5, 1.0, 1.5]
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
    if "sequential" in cfg.ablate.variants:
        chain = sequential_chain(cfg)
        extra += [{"name": link, "datasets": [dataset], "on_top_of": [previous]}
                  for previous, link, dataset in zip(chain, chain[1:], order[1:])]
    data = cfg.model_dump(mode="json")
    known = {a["name"] for a in data["adapters"]}
    data["adapters"] += [a for a in extra if a["name"] not in known]
    return RunConfig.model_validate(data)


def variant_config(cfg: RunConfig, name: str, **search) -> RunConfig:
    """A config whose run dir `ablate/<name>` shares the parent's curated data and adapters
    (links) and searches with `search` settings instead."""
    root = link_shared(cfg.run_dir, RunLayout(cfg.run_dir).ablation(name), ("curate", "adapters"))
    data = cfg.model_dump(mode="json")
    data["run_dir"] = str(root)
    data["search"].update(search)
    return RunConfig.model_validate(data)


def _fusions(cfg: RunConfig, force: bool) -> dict[str, Path]:
    """Run the fusion variants' searches; label -> fused adapter directory."""
    from .search import search_weights

    n = len(cfg.search_adapters)
    variants, out = cfg.ablate.variants, {}
    fixed = [("weights_one", "weights-one", "V0.5 fusion, weights 1", 1.0),
             ("uniform", "uniform", f"fusion, uniform 1/{n}", round(1.0 / n, 6))]
    for key, folder, label, weight in fixed:
        if key in variants:
            vcfg = variant_config(cfg, folder, method="grid", grid_values=[weight],
                                  halving_fractions=None, export_merged=False)
            search_weights(vcfg, force=force)
            out[label] = RunLayout(vcfg.run_dir).fused
    if "searched" in variants:
        search_weights(cfg, force=force)
        out[f"V1 fusion, searched ({cfg.search.method})"] = RunLayout(cfg.run_dir).fused
    if "gradient" in variants:
        vcfg = variant_config(cfg, "gradient", method="gradient", halving_fractions=None,
                              export_merged=False, **_PLAIN_SUM)
        search_weights(vcfg, force=force)
        out["fusion, learned (gradient)"] = RunLayout(vcfg.run_dir).fused
    out.update(_finer_fusions(cfg, force))
    return out


def _finer_fusions(cfg: RunConfig, force: bool) -> dict[str, Path]:
    """Issue-15 variants: layer-wise learned weights (and a per-adapter grid multiplier on
    them), and the dense merge operators searched by the config's method."""
    from .search import search_weights

    variants, out = cfg.ablate.variants, {}
    plain = {"halving_fractions": None, "export_merged": False}
    if "layerwise" in variants or "layerwise_refined" in variants:
        vcfg = variant_config(cfg, "layerwise", method="gradient", granularity="layer",
                              operator="sum", layer_weights_from=None, **plain)
        search_weights(vcfg, force=force)
        if "layerwise" in variants:
            out["fusion, layer-wise learned (gradient)"] = RunLayout(vcfg.run_dir).fused
        if "layerwise_refined" in variants:
            learned = RunLayout(vcfg.run_dir).search / "best.json"
            rcfg = variant_config(cfg, "layerwise-refined", method="grid", granularity="layer",
                                  operator="sum", layer_weights_from=str(learned),
                                  grid_values=REFINE_MULTIPLIERS, **plain)
            search_weights(rcfg, force=force)
            out["fusion, layer-wise x grid multiplier"] = RunLayout(rcfg.run_dir).fused
    method = "grid" if cfg.search.method == "gradient" else cfg.search.method
    for op in ("ties", "dare", "magnitude"):
        if op in variants:
            vcfg = variant_config(cfg, op, method=method, operator=op, granularity="adapter",
                                  layer_weights_from=None, **plain)
            best = search_weights(vcfg, force=force)
            fused = RunLayout(vcfg.run_dir).fused
            svd = json.loads((fused / "svd_report.json").read_text())
            name = op.upper() if op != "magnitude" else op
            out[f"fusion, {name} ({method}, density {best['best_density']:g}; SVD rank "
                f"{svd['rank']}, error {100 * svd['relative_error']:.1f}%)"] = fused
    return out


def build_variants(cfg: RunConfig, force: bool = False) -> dict[str, Path | None]:
    """Curate, train and fuse whatever the configured variants need (skipping what is up to
    date); returns label -> adapter directory (None: the base model), in table order."""
    from .curate import curate
    from .train import train_adapters

    if cfg.rounds:
        raise UserError("ablate: compares the variants of one fusion; remove `rounds` from the "
                        "config (or ablate each round's config)")
    acfg = ablation_config(cfg)
    layout = RunLayout(cfg.run_dir)
    curate(acfg, force=force)
    datasets = [d.name for d in cfg.datasets]
    needed = list(datasets)
    if "fused_dataset" in cfg.ablate.variants:
        needed.append(ALL_DATA)
    if "sequential" in cfg.ablate.variants:
        needed += sequential_chain(cfg)[1:]
    train_adapters(acfg, needed, force=force)
    models: dict[str, Path | None] = {"base": None}
    if "per_dataset" in cfg.ablate.variants:
        models.update({f"V0.1 adapter:{d}": layout.adapter(d) for d in datasets})
    if "fused_dataset" in cfg.ablate.variants:
        models["V0.2 one adapter, all datasets"] = layout.adapter(ALL_DATA)
    if "sequential" in cfg.ablate.variants:
        order = cfg.ablate.sequential_order or datasets
        models[f"V0.4 sequential ({' -> '.join(order)})"] = layout.adapter(sequential_chain(cfg)[-1])
    models.update(_fusions(cfg, force))
    return models


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


def ablate(cfg: RunConfig, force: bool = False) -> dict:
    """Build and score every configured variant with the same eval; write the comparison."""
    from .evaluate import evaluate

    models = build_variants(cfg, force)
    out = RunLayout(cfg.run_dir).ablation("eval")
    table = evaluate(ablation_config(cfg), force=force, models=models, out=out)
    table = comparison(table, [m for m in models if m.startswith("V0.1 ")])
    root = RunLayout(cfg.run_dir).ablation()
    write_json(root / "table.json", table)
    write_text(root / "table.md", _markdown(table))
    write_text(root / "table.csv", to_csv(table))
    plot_table(table, root / "table.png")
    print(_markdown(table))
    print(f"ablate: table in {root / 'table.md'}")
    return table
