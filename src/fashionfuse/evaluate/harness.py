"""`evaluate(cfg)`: lm-evaluation-harness scores of base, adapters and fused model, side by side.

The base model is loaded once per process; each evaluated model is the same resident PeftModel
with a different set of active adapters, so switching costs nothing. No response cache is used
(lm-eval's cache is keyed by request only and would leak answers between models).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..base_model import default_device, load_base_model, load_tokenizer
from ..config import RunConfig, config_hash
from ..lora import attach_adapters, set_fusion_weights
from ..rundir import (RunLayout, atomic_dir, fingerprint, read_manifest, write_json,
                      write_manifest, write_text)
from .benchmarks import PREFIX, write_local_leaderboard_tasks
from .presets import PRESETS, TaskSpec, custom_specs
from .table import build_table, plot_table, to_csv, to_markdown
from .tasks import prepare_include_paths


class EvalError(RuntimeError):
    """Evaluation cannot run (no tasks, missing artifacts)."""


def models_to_evaluate(cfg: RunConfig) -> dict[str, Path | None]:
    """Model label -> adapter directory (None for the bare base), per `eval.models`."""
    layout = RunLayout(cfg.run_dir)
    out: dict[str, Path | None] = {}
    for kind in cfg.eval.models:
        if kind == "base":
            out["base"] = None
        elif kind == "adapters":
            for d in cfg.datasets:
                out[f"adapter:{d.name}"] = layout.adapter(d.name)
        elif kind == "fused":
            out["fused"] = layout.fused
    for label, path in out.items():
        if path is not None and not (path / "adapter_config.json").exists():
            raise EvalError(f"{label}: {path} has no adapter (run the earlier stages first)")
    return out


def task_specs(cfg: RunConfig) -> list[TaskSpec]:
    """Every task to run: the preset's (local copies when benchmark_data is set) then custom ones."""
    specs: list[TaskSpec] = []
    if cfg.eval.preset:
        specs += PRESETS[cfg.eval.preset](PREFIX if cfg.eval.benchmark_data else "")
    specs += custom_specs(list(cfg.eval.tasks), cfg.eval.num_fewshot)
    if not specs:
        raise EvalError("eval: no tasks configured (set eval.preset or eval.tasks)")
    return specs


def _merge_results(parts: list[dict]) -> dict:
    """Merge lm-eval results dicts of several calls (different shot counts) into one."""
    merged = dict(parts[0])
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                "samples", "group_subtasks"):
        combined: dict = {}
        for p in parts:
            combined.update(p.get(key) or {})
        if combined:
            merged[key] = combined
    return merged


def eval_fingerprint(cfg: RunConfig, models: dict[str, Path | None]) -> str:
    from .benchmarks import __file__ as benchmarks_code  # task generation is part of the input
    from ..rundir import path_fingerprint

    return fingerprint({
        "benchmark_data": path_fingerprint(cfg.eval.benchmark_data) if cfg.eval.benchmark_data else None,
        "task_code": path_fingerprint(benchmarks_code),
        "stage": "eval", "eval": cfg.eval.model_dump(mode="json"), "seed": cfg.seed,
        "model": cfg.model.model_dump(mode="json"),
        "adapters": {k: (read_manifest(v.parent if k == "fused" else v) or {}).get("fingerprint")
                     for k, v in models.items() if v is not None},
    })


def evaluate(cfg: RunConfig, force: bool = False) -> dict:
    """Run lm-eval on every configured model; write per-model results JSON and the table."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    specs = task_specs(cfg)
    layout = RunLayout(cfg.run_dir)
    models = models_to_evaluate(cfg)
    fp = eval_fingerprint(cfg, models)
    manifest = read_manifest(layout.eval)
    if not force and manifest and manifest.get("fingerprint") == fp:
        print("eval: up to date")
        return json.loads((layout.eval / "table.json").read_text())

    include = prepare_include_paths(cfg.eval.include_paths, layout.root / "eval_tasks")
    if cfg.eval.benchmark_data:
        include.append(str(write_local_leaderboard_tasks(cfg.eval.benchmark_data,
                                                         layout.root / "eval_tasks" / "leaderboard")))
    by_shots: dict[int | None, list[str]] = {}
    for spec in specs:
        by_shots.setdefault(spec.num_fewshot, []).append(spec.task)
    task_manager = TaskManager(include_path=include or None)
    quantized = cfg.eval.load_in_4bit
    quantized = cfg.model.quantization.bits == 4 if quantized is None else quantized
    tokenizer = load_tokenizer(cfg.model)
    base = load_base_model(cfg.model, quantized=quantized, device=default_device())
    adapters = {label.split(":", 1)[-1]: path for label, path in models.items() if path is not None}
    model = attach_adapters(base, adapters) if adapters else base
    results_by_model: dict[str, dict] = {}
    with atomic_dir(layout.eval) as tmp:
        for label, path in models.items():
            if adapters:
                active = label.split(":", 1)[-1]
                set_fusion_weights(model, {n: (1.0 if n == active else 0.0) for n in adapters})
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.eval.batch_size)
            parts = []
            for shots, names in by_shots.items():
                print(f"eval {label}: {len(names)} task(s), num_fewshot={shots}")
                parts.append(lm_eval.simple_evaluate(
                    model=lm, tasks=names, num_fewshot=shots, limit=cfg.eval.limit,
                    task_manager=task_manager, log_samples=cfg.eval.log_samples, use_cache=None,
                    random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                    fewshot_random_seed=cfg.seed,
                ))
            res = _merge_results([dict(p) for p in parts])
            res = json.loads(json.dumps(dict(res), default=handle_non_serializable))
            safe = label.replace(":", "_")
            write_text(tmp / safe / "results.json", json.dumps(res, indent=2) + "\n")
            results_by_model[label] = res
        table = build_table(results_by_model, specs)
        write_json(tmp / "table.json", table)
        write_text(tmp / "table.md", to_markdown(table))
        write_text(tmp / "table.csv", to_csv(table))
        plot_table(table, tmp / "table.png")
        write_manifest(tmp, stage="eval", fingerprint=fp, config_hash=config_hash(cfg.eval),
                       inputs={k: str(v) for k, v in models.items()}, seed=cfg.seed,
                       metrics={r["model"]: r["average"] for r in table["rows"]})
    print(to_markdown(table))
    return table
