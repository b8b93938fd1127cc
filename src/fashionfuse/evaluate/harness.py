"""`evaluate(cfg)`: lm-evaluation-harness scores of base, adapters and fused model, side by side.

The base model is loaded once per process; each evaluated model is the same resident PeftModel
with a different set of active adapters, so switching costs nothing. Under `accelerate launch`
(or torchrun) every process holds the resident model and lm-eval shards the requests across
processes and gathers the results on rank 0, which writes the artifacts (data parallelism; on
CPU too, where lm-eval's own HFLM would not shard). No response cache is used
(lm-eval's cache is keyed by request only and would leak answers between models).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..architectures import check_tokenizer_fits
from ..base_model import (
    base_fingerprint_parts,
    default_device,
    load_base_model,
    load_tokenizer,
    quantization_record,
    scoring_dtype,
)
from ..config import RunConfig, config_hash
from ..errors import UserError
from .lm_eval_run import TaskSet, prepare_include_paths, task_manager, wrap_model
from .paired import item_values
from ..adapters.routing import build_router, is_router
from ..adapters.runtime import attach_adapters, set_fusion_weights
from ..rundir import (
    RunLayout,
    artifact_id,
    atomic_dir,
    fingerprint,
    is_up_to_date,
    path_fingerprint,
    without_unset,
    write_json,
    write_manifest,
    write_text,
)
from .benchmarks import PREFIX, write_local_leaderboard_tasks
from .presets import PRESETS, RETENTION, TaskSpec, custom_specs
from .skills import skill_specs, test_files, write_skill_tasks
from .table import (
    build_table,
    plot_table,
    standard_errors,
    stderr_markdown,
    to_csv,
    to_markdown,
)


class EvalError(UserError, RuntimeError):
    """Evaluation cannot run (no tasks, missing artifacts)."""


def _data_parallel():
    """(rank, world size, accelerator) under `accelerate launch`/`torchrun`; (0, 1, None) alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from accelerate import Accelerator

    from ..devices import process_placement

    # gloo on the CPU where CUDA is not visible or FASHIONFUSE_DIST_BACKEND=gloo asks for it
    acc = Accelerator(cpu=process_placement().device == "cpu")
    if acc.num_processes != int(os.environ["WORLD_SIZE"]):
        raise EvalError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate "
                        f"sees {acc.num_processes} processes")
    return acc.process_index, acc.num_processes, acc


def models_to_evaluate(cfg: RunConfig) -> dict[str, Path | None]:
    """Model label -> adapter directory (None for the bare base), per `eval.models`."""
    layout = RunLayout(cfg.run_dir)
    out: dict[str, Path | None] = {}
    for kind in cfg.eval.models:
        if kind == "base":
            out["base"] = None
        elif kind == "adapters":
            for name in cfg.adapter_names:
                out[f"adapter:{name}"] = layout.adapter(name)
        elif kind == "fused":
            out["fused"] = layout.fused
        elif kind == "merged":
            out["merged"] = layout.search / "merged"
    for label, path in out.items():
        marker = "config.json" if label == "merged" else "adapter_config.json"
        if path is not None and not (path / marker).exists():
            hint = " (set search.export_merged: true)" if label == "merged" else ""
            raise EvalError(f"{label}: {path} has no {marker} (run the earlier stages first){hint}")
    return out


def adapter_keys(models: dict[str, Path | None]) -> dict[str, str]:
    """PEFT adapter name of each evaluated adapter: m0, m1, ... (labels such as `adapter:chat`
    or `V0.4 sequential` are not valid module names)."""
    labels = [label for label, path in models.items()
              if path is not None and label != "merged" and not is_searched_fusion(path)
              and not is_router(path)]
    return {label: f"m{i}" for i, label in enumerate(labels)}


def is_searched_fusion(path: Path | None) -> bool:
    """Whether an evaluated model is a search's `best.json`: its fusion applied exactly to a
    base with the run's adapters (dense operators through their merged deltas), not an
    exported adapter."""
    return path is not None and Path(path).name == "best.json"


def activate(model, key: str | None, keys: list[str]) -> None:
    """Make the resident PeftModel one evaluated model: adapter `key` alone at weight 1, or the
    bare base (`key` None)."""
    set_fusion_weights(model, {k: (1.0 if k == key else 0.0) for k in keys})


def task_specs(cfg: RunConfig) -> list[TaskSpec]:
    """Every task to run: the per-skill tasks, the preset's (local copies when benchmark_data is
    set), then custom ones."""
    specs: list[TaskSpec] = skill_specs(cfg) if cfg.eval.skill_tasks else []
    if cfg.eval.preset:
        keep_columns, limit = cfg.eval.preset_tasks, cfg.eval.preset_limit
        specs += [replace(s, limit=limit.get(s.column) if isinstance(limit, dict) else limit)
                  for s in PRESETS[cfg.eval.preset](PREFIX if cfg.eval.benchmark_data else "")
                  if keep_columns is None or s.column in keep_columns]
    specs += custom_specs(list(cfg.eval.tasks), cfg.eval.num_fewshot)
    keep = cfg.eval.retention
    if keep is not None:
        shots = keep.num_fewshot if keep.num_fewshot is not None else cfg.eval.num_fewshot
        specs += [TaskSpec(t, shots, "", t, RETENTION, keep.limit) for t in keep.tasks]
    if not specs:
        raise EvalError("eval: no tasks configured (set eval.preset, eval.tasks or eval.skill_tasks)")
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


def _eval_inputs(cfg: RunConfig) -> dict:
    """What every model's scores depend on besides the model: eval section, base weights, the
    benchmark files, the task YAMLs under include_paths and the task code."""
    from . import benchmarks, skills  # the generated task YAMLs are part of the input

    return {
        "skills": ({name: path_fingerprint(p) if p.is_file() else None
                    for name, p in test_files(cfg).items()} if cfg.eval.skill_tasks else None),
        "skill_code": path_fingerprint(skills.__file__),
        "benchmark_data": path_fingerprint(cfg.eval.benchmark_data) if cfg.eval.benchmark_data else None,
        "task_code": path_fingerprint(benchmarks.__file__),
        "include_paths": {p: path_fingerprint(p) for p in cfg.eval.include_paths},
        "stage": "eval", "kept": "per-item values",
        "eval": without_unset(cfg.eval.model_dump(mode="json"), ("retention",)),
        "seed": cfg.seed,
        "model": cfg.model.model_dump(mode="json"), "base": base_fingerprint_parts(cfg.model),
    }


def _scored_id(path: Path | None) -> str | None:
    """The evaluated artifact's identity (its content hash or fingerprint); None: the base."""
    if path is None:
        return None
    return artifact_id(path.parent if is_searched_fusion(path) else path) or artifact_id(path.parent)


def eval_fingerprint(cfg: RunConfig, models: dict[str, Path | None],
                     inputs: dict | None = None) -> str:
    """Everything the scores depend on: `_eval_inputs` (computed here unless given: it hashes
    the benchmark files) and the evaluated artifacts' contents."""
    return fingerprint({**(inputs if inputs is not None else _eval_inputs(cfg)),
                        "adapters": {k: _scored_id(v) for k, v in models.items() if v is not None}})


def model_fingerprint(inputs: dict, label: str, path: Path | None) -> str:
    """One model's scores' key in the per-model cache (`eval.cache/`): the eval's inputs less
    the list of models, and what was scored (the same adapter under another label, in another
    eval or ablation with the same settings, is not scored again)."""
    settings = {k: v for k, v in inputs["eval"].items() if k != "models"}
    return fingerprint({**inputs, "eval": settings, "scored": _scored_id(path),
                        "full_model": label == "merged"})


@dataclass
class EvalSetup:
    """Everything shared by the models scored in one eval: tasks, the resident model with every
    adapter attached, and the data-parallel world."""

    specs: list[TaskSpec]
    by_shots: dict[tuple, list[str]]  # tasks by (few-shot count, own limit): one call each
    task_manager: object
    tokenizer: object
    model: object
    keys: dict[str, str]  # label -> PEFT adapter name on the resident model
    device: str
    rank: int
    world: int
    accelerator: object
    task_sets: dict = field(default_factory=dict)  # by_shots key -> TaskSet, on first use
    lm: object = None  # the HFLM around the resident model, shared by every model scored on it
    resident_as: str = ""  # the resident model's weights as scored (see _weights_as_scored)
    weight_dtype: str | None = None  # the dtype the base is loaded in (see scoring_dtype)
    scored_as: dict[str, str] = field(default_factory=dict)  # label -> weights as scored
    tokens: dict[str, int] = field(default_factory=dict)  # label -> token positions run (rank's)

    def tasks_for(self, key: tuple, seed: int) -> TaskSet:
        """The task set of one (few-shot count, limit) group, loaded once for every model."""
        if key not in self.task_sets:
            self.task_sets[key] = TaskSet(self.task_manager, self.by_shots[key],
                                          num_fewshot=key[0], seed=seed)
        return self.task_sets[key]


def _setup(cfg: RunConfig, models: dict[str, Path | None], dtype: str) -> EvalSetup:
    """Write the task folders, build the task manager, load the base once (in `dtype`, see
    scoring_dtype), attach adapters."""
    layout = RunLayout(cfg.run_dir)
    specs = task_specs(cfg)
    rank, world, accelerator = _data_parallel()
    tasks_dir = layout.root / ("eval_tasks" if rank == 0 else f"eval_tasks.rank{rank}")
    include = prepare_include_paths(cfg.eval.include_paths, tasks_dir)
    if cfg.eval.benchmark_data:
        include.append(str(write_local_leaderboard_tasks(cfg.eval.benchmark_data,
                                                         tasks_dir / "leaderboard")))
    tokenizer = load_tokenizer(cfg.model)
    if cfg.eval.skill_tasks:
        include.append(str(write_skill_tasks(cfg, tokenizer, tasks_dir / "skills")))
    by_shots: dict[tuple, list[str]] = {}
    for spec in specs:
        by_shots.setdefault((spec.num_fewshot, spec.limit), []).append(spec.task)
    device = str(accelerator.device) if accelerator is not None else default_device()
    base = load_base_model(cfg.model, quantized=_quantized(cfg), device=device, weight_dtype=dtype)
    check_tokenizer_fits(base, tokenizer)
    keys = adapter_keys(models)
    model = attach_adapters(base, {keys[label]: models[label] for label in keys}) if keys else base
    resident = _weights_as_scored(model)
    return EvalSetup(specs, by_shots, task_manager([*include], [s.task for s in specs]), tokenizer,
                     model, keys, device, rank, world, accelerator, resident_as=resident,
                     weight_dtype=dtype)


def _quantized(cfg: RunConfig) -> bool:
    """Whether eval loads the base in 4-bit (`eval.load_in_4bit`, else as the model is trained)."""
    quantized = cfg.eval.load_in_4bit
    return cfg.model.quantization.bits == 4 if quantized is None else quantized


def _weights_as_scored(model) -> str:
    """A model's weights as scored: 4-bit (quant type, the dtype it was quantised from, compute
    dtype) or its plain dtype."""
    dtype = str(model.dtype).removeprefix("torch.")
    record = quantization_record(model)
    if record is None:
        return dtype
    return f"{record['quant_type']} 4-bit from {record['weight_dtype']}, {dtype} compute"


def _wrap(cfg: RunConfig, ev: EvalSetup, model):
    """The lm-eval wrapper of one scored model, with this eval's batch size, window, prefix
    sharing and data-parallel world."""
    return wrap_model(model, ev.tokenizer, cfg.eval.batch_size, ev.accelerator, ev.rank, ev.world,
                      shared_contexts=cfg.eval.shared_contexts, max_length=cfg.eval.max_length)


def _score_model(cfg: RunConfig, ev: EvalSetup, label: str, path: Path | None) -> dict | None:
    """lm-eval results of one model (on rank 0; None on the other ranks)."""
    from lm_eval.utils import handle_non_serializable

    if label == "merged":  # a separate full model, scored in the dtype it was exported in
        from transformers import AutoModelForCausalLM

        target = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(ev.device).eval()
        ev.scored_as[label] = str(target.dtype).removeprefix("torch.")
        lm = _wrap(cfg, ev, target)
    elif is_router(path) or is_searched_fusion(path):  # on a second base of its own: PEFT's
        from .lm_eval_model import attach_searched_fusion  # Arrow routing, or the exact fusion

        build, how = ((build_router, "Arrow routing") if is_router(path)
                      else (attach_searched_fusion, "exact merge"))
        base = load_base_model(cfg.model, quantized=_quantized(cfg), device=ev.device,
                               weight_dtype=ev.weight_dtype)
        ev.scored_as[label] = f"{ev.resident_as}, {how}"
        lm = _wrap(cfg, ev, build(base, path))
    else:
        ev.scored_as[label] = ev.resident_as
        if ev.keys:
            activate(ev.model, ev.keys.get(label), list(ev.keys.values()))
        if ev.lm is None:
            ev.lm = _wrap(cfg, ev, ev.model)
        lm = ev.lm
    tokens_before = lm.tokens_through_model
    parts = []
    for (shots, own_limit), names in ev.by_shots.items():
        if ev.rank == 0:
            print(f"eval {label}: {len(names)} task(s), num_fewshot={shots}, processes={ev.world}, "
                  f"weights {ev.scored_as[label]}")
        limit = own_limit if own_limit is not None else cfg.eval.limit
        parts.append(ev.tasks_for((shots, own_limit), cfg.seed).score(
            lm, limit=limit, log_samples=True))  # per-item values are always kept
    ev.tokens[label] = lm.tokens_through_model - tokens_before
    if ev.rank != 0:
        return None
    res = _merge_results([dict(p) for p in parts])
    res["items"] = item_values(res, ev.specs)  # for paired comparisons (evaluate/paired.py)
    if not cfg.eval.log_samples:
        res.pop("samples", None)
    return json.loads(json.dumps(res, default=handle_non_serializable))


def _write_eval(cfg: RunConfig, fp: str, models: dict, results_by_model: dict,
                scored: tuple[list[TaskSpec], int, dict], out: Path, timings: dict) -> dict:
    """Per-model results JSON, the side-by-side table (MD, CSV, JSON, PNG), where the time
    went (timings.json: loading the model and task folders, then each model with the task
    loading of the first, as first scored), the manifest. `scored`: the task specs, the
    processes and the weights as scored per model."""
    specs, world, scored_as = scored
    table = build_table(results_by_model, specs)
    table["stderr"] = standard_errors(table, results_by_model, specs)
    with atomic_dir(out) as tmp:
        for label, res in results_by_model.items():
            write_text(tmp / results_folder(label) / "results.json", json.dumps(res, indent=2) + "\n")
        write_json(tmp / "table.json", table)
        write_json(tmp / "timings.json", timings)
        write_text(tmp / "table.md", to_markdown(table))
        write_text(tmp / "stderr.md", stderr_markdown(table))
        write_text(tmp / "table.csv", to_csv(table))
        plot_table(table, tmp / "table.png")
        write_manifest(tmp, stage="eval", fingerprint=fp, config_hash=config_hash(cfg.eval),
                       inputs={k: str(v) for k, v in models.items()}, seed=cfg.seed,
                       metrics={r["model"]: r["average"] for r in table["rows"]},
                       extra={"processes": world, "scored_weights": scored_as})
    print(to_markdown(table))
    return table


def results_folder(label: str) -> str:
    """A results folder name for a model label (`adapter:chat` -> `adapter_chat`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def evaluate(cfg: RunConfig, force: bool = False, models: dict[str, Path | None] | None = None,
             out: Path | None = None) -> dict:
    """Run lm-eval on every configured model (or on `models`: label -> adapter directory, None
    for the bare base); write per-model results JSON and the table into `eval/` (or `out`)."""
    out = out or RunLayout(cfg.run_dir).eval
    task_specs(cfg)  # no tasks: fail before loading anything
    models = models or models_to_evaluate(cfg)
    inputs = _eval_inputs(cfg)
    # the dtype every model is scored in (the adapters' training dtype, see scoring_dtype)
    inputs["compute_dtype"] = scoring_dtype(cfg.model, [p for p in models.values() if p])
    fp = eval_fingerprint(cfg, models, inputs)
    if not force and is_up_to_date(out, fp):
        print("eval: up to date")
        return json.loads((out / "table.json").read_text())
    cache = RunLayout(cfg.run_dir).root / "eval.cache"
    keys = {label: model_fingerprint(inputs, label, path) for label, path in models.items()}
    cached = {} if force else {label: json.loads((cache / f"{k}.json").read_text())
                               for label, k in keys.items() if (cache / f"{k}.json").is_file()}
    todo = {label: path for label, path in models.items() if label not in cached}
    for label in cached:
        print(f"eval {label}: scored before with the same settings (eval.cache/{keys[label]}.json)")
    t0 = time.perf_counter()
    ev = _setup(cfg, todo, inputs["compute_dtype"]) if todo else None
    rank, world, _ = (ev.rank, ev.world, None) if ev else _data_parallel()
    timings = {"setup_s": round(time.perf_counter() - t0, 3), "models_s": {},
               "tokens_through_model": {}}
    scored_as, results = {}, {}
    for label in models:
        if label in cached:
            entry = cached[label]
        else:
            t0 = time.perf_counter()
            res = _score_model(cfg, ev, label, todo[label])
            entry = {"results": res, "scored_as": ev.scored_as[label],
                     "tokens": ev.tokens[label], "seconds": round(time.perf_counter() - t0, 3)}
            if rank == 0:  # kept at once: an interrupted eval resumes after this model
                write_json(cache / f"{keys[label]}.json", entry)
        results[label], scored_as[label] = entry["results"], entry["scored_as"]
        timings["models_s"][label] = entry["seconds"]
        timings["tokens_through_model"][label] = entry["tokens"]
    if rank != 0:
        return {}
    return _write_eval(cfg, fp, models, results, (task_specs(cfg), world, scored_as), out, timings)
