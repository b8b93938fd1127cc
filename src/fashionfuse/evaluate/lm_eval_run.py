"""lm-evaluation-harness on a model already in memory, shared by `eval` and the search's task
objective: local task folders, the task manager, the HFLM wrapper (sharded by rank under data
parallelism), one `simple_evaluate` call with every seed fixed and no response cache (lm-eval's
cache is keyed by request only and would hand one model's answers to another), and a task's
headline metric.

Local task folders: lm-eval resolves `dataset_kwargs.data_files` against the working directory;
to make shipped task folders work from anywhere, `prepare_include_paths` copies each folder's
YAMLs into the run directory with those paths made absolute. YAMLs that plain `yaml.safe_load`
cannot read (custom tags such as `!function`) keep their folder as an include path unchanged.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from ..errors import MissingFileError

PREFERRED_METRICS = ("acc_norm,none", "acc,none", "mc2,none", "exact_match,none")


def headline_metric(task_results: dict) -> tuple[str, float] | None:
    """The task's headline metric (acc_norm, then acc, mc2, exact_match) and its value."""
    for key in PREFERRED_METRICS:
        if key in task_results and isinstance(task_results[key], (int, float)):
            return key.split(",")[0], float(task_results[key])
    return None


def _absolutise(data_files, base: Path):
    if isinstance(data_files, str):
        p = Path(data_files)
        return str(p if p.is_absolute() else (base / p).resolve())
    if isinstance(data_files, list):
        return [_absolutise(x, base) for x in data_files]
    if isinstance(data_files, dict):
        return {k: _absolutise(v, base) for k, v in data_files.items()}
    return data_files


def prepare_include_paths(include_paths: list[str], out_dir: Path) -> list[str]:
    """Return include paths for lm-eval's TaskManager, rewriting relative data paths."""
    result: list[str] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, folder in enumerate(include_paths):
        src = Path(folder)
        if not src.is_dir():
            raise MissingFileError(f"include_paths: {folder}: folder not found")
        copied = out_dir / f"{i}_{src.name}"
        copied.mkdir(parents=True, exist_ok=True)
        plain = True
        for yml in sorted(src.glob("*.yaml")):
            try:
                doc = yaml.safe_load(yml.read_text())
            except yaml.YAMLError:
                plain = False
                break
            files = (doc or {}).get("dataset_kwargs", {}).get("data_files")
            if files is not None:
                doc["dataset_kwargs"]["data_files"] = _absolutise(files, yml.parent)
            (copied / yml.name).write_text(yaml.safe_dump(doc, sort_keys=False))
        result.append(str(copied if plain else src.resolve()))
    return result


def task_manager(include_paths: list[str], task_names: list[str]):
    """lm-eval's TaskManager for `task_names`. Indexing lm-eval's ~10k built-in task YAMLs takes
    seconds, so when the include paths define every requested task (the demo tasks, the local
    leaderboard copies) only they are indexed; built-in tasks are indexed when one is asked for."""
    from lm_eval.tasks import TaskManager

    if include_paths:
        local = TaskManager(include_path=list(include_paths), include_defaults=False)
        if set(task_names) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=list(include_paths) or None)



@functools.cache
def _builtin_task_names() -> frozenset[str]:
    """Every task and group lm-eval ships (indexing them takes seconds: once a process)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def task_name_problems(cfg, needs_eval: bool = True) -> list[str]:
    """One line for every lm-eval task name in the config that lm-eval cannot resolve (built in,
    or defined under the section's include paths), with the closest known names; and, with
    `needs_eval`, one when no eval task is configured at all. Checked before any work; nothing is written (the
    include folders are indexed where they are, not copied)."""
    import difflib

    from lm_eval.tasks import TaskManager

    ev, obj = cfg.eval, cfg.search.objective
    named = [("eval.tasks", ev.tasks, ev.include_paths, "eval.include_paths"),
             ("search.objective.tasks", obj.tasks, obj.include_paths,
              "search.objective.include_paths")]
    if ev.retention is not None:
        named.append(("eval.retention.tasks", ev.retention.tasks, ev.include_paths,
                      "eval.include_paths"))
    if obj.retention is not None:
        named.append(("search.objective.retention.tasks", obj.retention.tasks,
                      obj.include_paths, "search.objective.include_paths"))
    problems = []
    if needs_eval and not (ev.preset or ev.tasks or ev.skill_tasks or ev.retention):
        problems.append("eval: no tasks configured (set eval.preset, eval.tasks or "
                        "eval.skill_tasks)")
    for field, names, folders, folders_field in named:
        if not names:
            continue
        folders = [f for f in folders if Path(f).is_dir()]  # a missing one is its own problem
        known = set(TaskManager(include_path=folders, include_defaults=False).all_tasks
                    if folders else ())
        if set(names) - known:
            known |= _builtin_task_names()
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
                problems.append(
                    f"{field}: {name!r}: not an lm-eval task (built in or under "
                    f"{folders_field})" + (f"; did you mean {', '.join(close)}?" if close else ""))
    return problems


def wrap_model(model, tokenizer, batch_size, accelerator=None, rank: int = 0, world: int = 1,
               shared_contexts: bool = True, max_length: int | None = None):
    """The `fashionfuse` lm-eval model (`lm_eval_model.FashionfuseLM`, an HFLM) around a
    resident model. Under `accelerate launch`/`torchrun` it shards the requests by rank and
    gathers them on rank 0, on CPU too. With `shared_contexts`, requests that share a token
    prefix are scored with one pass over it. `max_length`: the longest row scored (default:
    the model's window). `lm.tokens_through_model` counts the token positions (padding
    included) the model has run."""
    from .lm_eval_model import FashionfuseLM

    return FashionfuseLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                         max_length=max_length, shared_contexts=shared_contexts, rank=rank,
                         world_size=world, accelerator=accelerator)


def run_tasks(lm, tasks: list[str], task_manager, *, num_fewshot: int | None,
              limit: float | None, seed: int, log_samples: bool = False) -> dict:
    """lm-eval's results dict for `tasks` on `lm`."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
        log_samples=log_samples, use_cache=None, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)


class TaskSet:
    """lm-eval tasks loaded once and scored on any number of models: what `run_tasks` does per
    call (load the datasets, set `num_fewshot` and the few-shot seed, seed every generator,
    `evaluate`), with the loading done once, each prompt rendered once and each request
    tokenised once per HFLM. Before each model the seeds and each task's few-shot sampler are
    reset, so every model gets the prompts a fresh `simple_evaluate` would build (the tests
    compare the two routes)."""

    def __init__(self, task_manager, tasks: list[str], *, num_fewshot: int | None, seed: int):
        from .lm_eval_model import render_prompts_once

        self.loaded = task_manager.load(list(tasks))
        self.seed, self.num_fewshot = seed, num_fewshot
        for task in self.loaded["tasks"].values():
            default = task.get_config("num_fewshot")
            if num_fewshot is not None and default != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif num_fewshot is None and default is None:
                task.set_config(key="num_fewshot", value=0)
            render_prompts_once(task)

    def score(self, lm, *, limit: float | None, log_samples: bool = False) -> dict | None:
        """lm-eval's results dict for these tasks on `lm` (None on ranks other than 0)."""
        import random

        import numpy as np
        from lm_eval.evaluator import evaluate
        from lm_eval.utils import set_torch_seed

        from .lm_eval_model import encode_pairs_once

        encode_pairs_once(lm)
        random.seed(self.seed)
        np.random.seed(self.seed)
        set_torch_seed(self.seed)
        for task in self.loaded["tasks"].values():
            task.set_fewshot_seed(seed=self.seed)
        results = evaluate(lm=lm, task_dict=self.loaded, limit=limit, log_samples=log_samples,
                           bootstrap_iters=100000, verbosity=None)
        if results is not None:
            results["config"] = {"limit": limit, "random_seed": self.seed,
                                 "numpy_seed": self.seed, "torch_seed": self.seed,
                                 "fewshot_seed": self.seed, "num_fewshot": self.num_fewshot,
                                 "batch_size": getattr(lm, "batch_size", None)}
        return results
