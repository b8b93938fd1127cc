"""Local lm-eval task folders: data paths in task YAMLs are taken relative to the YAML file.

lm-eval resolves `dataset_kwargs.data_files` against the working directory; to make shipped
task folders work from anywhere, `prepare_include_paths` copies each folder's YAMLs into the run
directory with those paths made absolute. YAMLs that plain `yaml.safe_load` cannot read (custom
tags such as `!function`) keep their folder as an include path unchanged.
"""

from __future__ import annotations

from pathlib import Path

import yaml


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
            raise FileNotFoundError(f"eval.include_paths: {folder}: folder not found")
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
