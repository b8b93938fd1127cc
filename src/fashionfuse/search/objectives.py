"""Held-out objectives for fusion-weight search (lower is better): the validation data, lm-eval
task scores, and the objectives built on them (`val_loss`, `lm_eval`, `mix`; see `registry`)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..errors import MissingFileError, UserError
from ..examples import collate, load_records, tokenize_records
from ..head_loss import summed_loss
from ..rundir import RunLayout


@dataclass
class ValidationLoss:
    """Token-weighted validation loss per dataset, combined by a weighted mean across datasets.

    The validation splits are tokenised and batched once; each candidate costs only forward
    passes of the resident model. For successive halving the examples are put in a seeded random
    order and cut into growing stages (`fractions`), so an early stage is an unbiased sample;
    within a stage they are sorted by length so batches pad little.
    """

    batches: dict[str, list[dict[str, torch.Tensor]]]
    weights: dict[str, float]
    fractions: list[float]
    stage_ends: dict[str, list[int]]  # per dataset: batches finished after each stage

    @classmethod
    def from_config(cls, cfg: RunConfig, tokenizer, device: str) -> "ValidationLoss":
        layout = RunLayout(cfg.run_dir)
        obj = cfg.search.objective
        fractions = list(cfg.search.halving_fractions or [1.0])
        batches, stage_ends = {}, {}
        for name in cfg.objective_datasets:
            path = layout.curated(name) / "validation.jsonl"
            if not path.exists():
                raise MissingFileError(f"{path}: validation split missing (run curate)")
            ex = tokenize_records(load_records(path, obj.max_samples_per_dataset), tokenizer,
                                  cfg.model.system_message, cfg.model.max_input_len,
                                  cfg.model.chat_template)
            random.Random(f"{cfg.seed}:{name}").shuffle(ex)
            batches[name], stage_ends[name] = [], []
            done = 0
            for frac in fractions:
                upto = max(done, min(len(ex), max(1, round(len(ex) * frac))))
                stage = sorted(ex[done:upto], key=lambda e: len(e["input_ids"]))
                bs = cfg.search.batch_size
                batches[name] += [{k: v.to(device) for k, v in
                                   collate(stage[i:i + bs], tokenizer.pad_token_id).items()}
                                  for i in range(0, len(stage), bs)]
                stage_ends[name].append(len(batches[name]))
                done = upto
        weights = {n: (obj.dataset_weights or {}).get(n, 1.0) for n in cfg.objective_datasets}
        return cls(batches, weights, fractions, stage_ends)

    @torch.no_grad()
    def per_dataset(self, model) -> dict[str, float]:
        """Token-weighted loss of every validation split (the last stage of `staged`)."""
        *_, (_, losses) = self.staged(model)
        return losses

    @torch.no_grad()
    def staged(self, model):
        """Yield (fraction, per-dataset losses) on the growing stages of every validation split.

        Each stage only runs the batches the previous stages did not, so a candidate stopped
        after the first stage costs only that stage's share of the full evaluation.
        """
        sums = {n: [0.0, 0] for n in self.batches}
        for k, frac in enumerate(self.fractions):
            for name, batches in self.batches.items():
                start = self.stage_ends[name][k - 1] if k else 0
                sums[name] = list(summed_loss(model, batches[start:self.stage_ends[name][k]],
                                              *sums[name]))
            yield frac, {n: v[0] / max(v[1], 1) for n, v in sums.items()}

    def combine(self, losses: dict[str, float]) -> float:
        z = sum(self.weights.values())
        return sum(self.weights[n] * losses[n] for n in losses) / z


class TaskScores:
    """Headline metric of each lm-eval task on the resident model (higher is better), run in
    memory through `lm_eval_run`: `objective.tasks`, or with `retention` the objective's
    retention tasks with their own shots and limit. Tasks scored on their test split are
    refused unless `allow_test_split` is set."""

    def __init__(self, cfg: RunConfig, tokenizer, retention: bool = False):
        from ..evaluate.lm_eval_run import prepare_include_paths, task_manager

        obj = cfg.search.objective
        term = obj.retention if retention else None
        tasks = list(term.tasks if term else obj.tasks)
        field = "search.objective.retention.tasks" if term else "search.objective.tasks"
        include = prepare_include_paths(obj.include_paths, RunLayout(cfg.run_dir).root / "search_tasks")
        self.task_manager = task_manager(include, tasks)
        self.tasks, self.tokenizer, self.seed = tasks, tokenizer, cfg.seed
        # the retention term's own shots and limit, each defaulting to the objective's
        self.num_fewshot = (term.num_fewshot if term and term.num_fewshot is not None
                            else obj.num_fewshot)
        self.limit = term.limit if term and term.limit is not None else obj.limit
        self.batch_size = cfg.search.batch_size
        self.task_set, self.lm = None, None
        for name, task in self.task_manager.load(list(self.tasks))["tasks"].items():
            if task.has_test_docs() and not obj.allow_test_split:
                raise UserError(
                    f"{field}: {name} is scored on its test split "
                    f"({task.config.test_split!r}); tuning weights on test data is refused "
                    "(use a validation split, or set search.objective.allow_test_split: true)")

    def score(self, model) -> dict[str, float]:
        """Headline metric per task of `model` as it is set now; the tasks are loaded on the
        first call and reused for every candidate (`lm_eval_run.TaskSet`)."""
        from ..evaluate.lm_eval_run import TaskSet, headline_metric, wrap_model

        if self.task_set is None:
            self.task_set = TaskSet(self.task_manager, self.tasks, num_fewshot=self.num_fewshot,
                                    seed=self.seed)
        if self.lm is None or self.lm.model is not model:
            self.lm = wrap_model(model, self.tokenizer, self.batch_size)
        res = self.task_set.score(self.lm, limit=self.limit)
        out = {}
        for t in self.tasks:
            hm = headline_metric(res["results"].get(t, {}))
            if hm is not None:
                out[t] = hm[1]
        return out


# --------------------------------------------------------------------------- the objectives
# Each is built from (cfg, tokenizer, device) and scores the resident model as it is set now:
# `score(model, trial)` -> {"score": lower is better, "per_dataset": {...}}, or None when a
# pruner stopped the trial early. `differentiable` objectives can drive `method: gradient`.


class ValLossObjective:
    """`val_loss`: the token-weighted validation loss, combined across datasets; with
    `halving_fractions` it is reported stage by stage and a pruner may stop a trial early."""

    differentiable = True

    def __init__(self, cfg: RunConfig, tokenizer, device: str):
        self.data = ValidationLoss.from_config(cfg, tokenizer, device)
        self.halving = bool(cfg.search.halving_fractions)

    def score(self, model, trial=None) -> dict | None:
        if not self.halving or trial is None:
            per = self.data.per_dataset(model)
            return {"per_dataset": per, "score": self.data.combine(per)}
        # steps count from 1: SuccessiveHalvingPruner's first rung is at step min_resource=1
        for step, (frac, per) in enumerate(self.data.staged(model), start=1):
            trial.report(self.data.combine(per), step)
            trial.set_user_attr("fraction_evaluated", frac)
            if frac < 1.0 and trial.should_prune():
                return None
        return {"per_dataset": per, "score": self.data.combine(per)}


class RetentionTerm:
    """`objective.retention`: minus `weight` times the mean headline metric of the retention
    tasks, with each task's score kept as `retention:<task>`."""

    def __init__(self, cfg: RunConfig, tokenizer):
        self.tasks = TaskScores(cfg, tokenizer, retention=True)
        self.weight = cfg.search.objective.retention.weight

    def score(self, model) -> tuple[dict[str, float], float]:
        """Per-task scores and the term added to the objective's score."""
        scores = self.tasks.score(model)
        mean = sum(scores.values()) / max(len(scores), 1)
        return {f"retention:{k}": v for k, v in scores.items()}, -self.weight * mean


def _with_retention(out: dict, term: RetentionTerm | None, model) -> dict:
    if term is None:
        return out
    per, added = term.score(model)
    return {"per_dataset": {**out["per_dataset"], **per}, "score": out["score"] + added}


class LmEvalObjective:
    """`lm_eval`: minus the mean headline metric of `objective.tasks` (minus the retention
    term's weighted mean, when one is set)."""

    differentiable = False

    def __init__(self, cfg: RunConfig, tokenizer, device: str):
        self.tasks = TaskScores(cfg, tokenizer)
        self.retention = RetentionTerm(cfg, tokenizer) if cfg.search.objective.retention else None

    def score(self, model, trial=None) -> dict:
        tasks = self.tasks.score(model)
        return _with_retention({"per_dataset": {f"task:{k}": v for k, v in tasks.items()},
                                "score": -sum(tasks.values()) / max(len(tasks), 1)},
                               self.retention, model)


class MixObjective:
    """`mix`: `(1 - mix_weight) * val_loss - mix_weight * mean task accuracy` (minus the
    retention term's weighted mean, when one is set)."""

    differentiable = False

    def __init__(self, cfg: RunConfig, tokenizer, device: str):
        self.data = ValidationLoss.from_config(cfg, tokenizer, device)
        self.tasks = TaskScores(cfg, tokenizer)
        self.retention = RetentionTerm(cfg, tokenizer) if cfg.search.objective.retention else None
        self.mix = cfg.search.objective.mix_weight

    def score(self, model, trial=None) -> dict:
        per = self.data.per_dataset(model)
        tasks = self.tasks.score(model)
        accuracy = sum(tasks.values()) / max(len(tasks), 1)
        return _with_retention(
            {"per_dataset": {**per, **{f"task:{k}": v for k, v in tasks.items()}},
             "score": (1 - self.mix) * self.data.combine(per) - self.mix * accuracy},
            self.retention, model)


def build_objective(cfg: RunConfig, tokenizer, device: str):
    """The objective `search.objective.type` names (see `registry`)."""
    from .registry import objective_class

    return objective_class(cfg.search.objective.type)(cfg, tokenizer, device)
