"""Per-skill tasks: each dataset's held-out test split (`datasets[].test_fraction`) as an
lm-eval task, so the eval sees what each adapter was trained for beside what the base could do.

A test record becomes one log-likelihood request: the conversation up to its last assistant turn,
rendered in the run's own template (`model.chat_template`), is the context; that turn as the
trainer sees it (reply and end-of-turn tokens) is the continuation. The metric,
`answer_token_prob`, is exp(log-likelihood / tokens): the geometric-mean probability the model
gives each token of the reference answer (exp of minus the per-token loss), in [0, 1] and
comparable across datasets of different answer lengths. The token count is that of lm-eval's
own split of context and continuation with the run's tokenizer, stored in each document; the
search never sees these records (they are held out at curation, before the validation split).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from ..chat_template import render_chat
from ..config import RunConfig
from ..errors import UserError
from ..rundir import RunLayout
from .presets import TaskSpec

PREFIX = "skill_"
METRIC = "answer_token_prob"
_METRIC_MODULE = "fashionfuse_skill_metric"


def skill_datasets(cfg: RunConfig) -> list[str]:
    """Datasets with a held-out test split."""
    return [d.name for d in cfg.datasets if d.test_fraction > 0]


def skill_specs(cfg: RunConfig) -> list[TaskSpec]:
    """One table column per dataset with a test split (`skill_<name>`)."""
    return [TaskSpec(f"{PREFIX}{name}", 0, f"{METRIC},none", f"{PREFIX}{name}", group="skill")
            for name in skill_datasets(cfg)]


def test_files(cfg: RunConfig) -> dict[str, Path]:
    """Each skill dataset's curated test split."""
    layout = RunLayout(cfg.run_dir)
    return {name: layout.curated(name) / "test.jsonl" for name in skill_datasets(cfg)}


def split_last_turn(messages: list[dict], system: str, tokenizer, template: str) -> tuple[str, str]:
    """(context, continuation) of a conversation's last assistant turn in the run's template,
    with trailing whitespace of the context moved to the continuation as lm-eval does."""
    chat = render_chat(tokenizer, messages, system, template)
    start, end = chat.assistant_spans[-1]
    context, continuation = chat.text[:start], chat.text[start:end]
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def continuation_tokens(tokenizer, context: str, continuation: str) -> int:
    """Tokens lm-eval scores for this pair: the whole text's tokens beyond the context's."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return len(encode(context + continuation)) - len(encode(context))


def process_results(doc: dict, results: list) -> dict:
    """lm-eval hook: the per-token probability of the reference answer."""
    loglikelihood = results[0][0]
    return {METRIC: math.exp(loglikelihood / doc["target_tokens"])}


def write_skill_tasks(cfg: RunConfig, tokenizer, out: Path) -> Path:
    """Write one task YAML and its documents per skill dataset into `out`; returns `out` (an
    include path)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{_METRIC_MODULE}.py").write_text(
        "from fashionfuse.evaluate.skills import process_results  # noqa: F401\n")
    for name, path in test_files(cfg).items():
        if not path.is_file():
            raise UserError(f"eval.skill_tasks: {path} not found (run `fashionfuse curate` with "
                            f"datasets[{name}].test_fraction set)")
        docs = []
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            system = rec.get("system") or cfg.model.system_message
            context, target = split_last_turn(rec["messages"], system, tokenizer,
                                              cfg.model.chat_template)
            docs.append({"id": rec["id"], "context": context, "target": target,
                         "target_tokens": max(continuation_tokens(tokenizer, context, target), 1)})
        if not docs:
            raise UserError(f"eval.skill_tasks: {path} is empty (raise datasets[{name}]."
                            "test_fraction or max_records)")
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
        _write_task_yaml(out, f"{PREFIX}{name}", data)
    return out


def _write_task_yaml(out: Path, task: str, data: Path) -> None:
    doc = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
           "test_split": "test", "output_type": "loglikelihood", "doc_to_text": "{{context}}",
           "doc_to_target": "{{target}}", "target_delimiter": "",
           "metric_list": [{"metric": METRIC, "aggregation": "mean", "higher_is_better": True}],
           "metadata": {"version": 1.0}}
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    # lm-eval's YAML loader resolves `!function module.name` next to the YAML file
    text += f"process_results: !function {_METRIC_MODULE}.process_results\n"
    (out / f"{task}.yaml").write_text(text)
