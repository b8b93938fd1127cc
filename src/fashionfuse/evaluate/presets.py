"""Evaluation presets: which lm-eval tasks, with how many shots, scored by which metric.

`leaderboard_v1` reproduces the Open LLM Leaderboard v1 settings of the paper's Table 5:
ARC-Challenge 25-shot acc_norm, HellaSwag 10-shot acc_norm, MMLU 5-shot acc averaged over the 57
subjects *unweighted* (the v1 leaderboard's mean of subject accuracies, not lm-eval's
size-weighted group score), TruthfulQA 0-shot mc2; no chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


# the general ability a fine-tune should keep: the group of the preset's columns
RETENTION = "retention"


@dataclass(frozen=True)
class TaskSpec:
    """One lm-eval task run: its name, shots, the metric key read from results, its table column,
    and the group its column is averaged in ("skill", "retention"; "" for none)."""

    task: str
    num_fewshot: int | None
    metric: str  # key in lm-eval's results, e.g. "acc_norm,none"
    column: str
    group: str = ""
    limit: float | None = None  # examples per task when not eval.limit (the retention block)


def lm_eval_tasks_dir() -> Path:
    """Folder of lm-eval's built-in task YAMLs."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects, read from lm-eval's own per-subject task files."""
    return sorted(p.stem.removeprefix("mmlu_") for p in (lm_eval_tasks_dir() / "mmlu" / "default").glob("mmlu_*.yaml"))


def leaderboard_v1(prefix: str = "") -> list[TaskSpec]:
    """The v1 leaderboard tasks; `prefix` names locally generated copies (e.g. "local_")."""
    specs = [
        TaskSpec(f"{prefix}arc_challenge", 25, "acc_norm,none", "arc_challenge", RETENTION),
        TaskSpec(f"{prefix}hellaswag", 10, "acc_norm,none", "hellaswag", RETENTION),
    ]
    specs += [TaskSpec(f"{prefix}mmlu_{s}", 5, "acc,none", "mmlu", RETENTION)
              for s in mmlu_subjects()]
    specs.append(TaskSpec(f"{prefix}truthfulqa_mc2", 0, "acc,none", "truthfulqa_mc2", RETENTION))
    return specs


PRESETS = {"leaderboard_v1": leaderboard_v1}


def custom_specs(tasks: list[str], num_fewshot: int | None) -> list[TaskSpec]:
    """Plain task names from the config: one column each, headline metric picked from results."""
    return [TaskSpec(t, num_fewshot, "", t) for t in tasks]
