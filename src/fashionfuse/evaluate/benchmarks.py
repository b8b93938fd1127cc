"""Offline leaderboard tasks from local benchmark files in their original schema.

Expected layout (that of `../shared/benchmarks/`):

    arc_challenge/test.jsonl          question, options[{label, text}], answer (label)
    hellaswag/validation.jsonl        activity_label, ctx, endings[4], label
    mmlu/{dev,test}/SUBJECT_{dev,test}.csv   headerless: question, A, B, C, D, answer letter
    truthfulqa/TruthfulQA.csv         Type, Category, Question, Best Answer, Correct Answers, Incorrect Answers, Source

Each file is converted to the schema of the Hugging Face dataset lm-eval's own task reads, and
a task YAML is written that `include`s lm-eval's built-in task (same prompt, target and metric
code) and only swaps the data source. HellaSwag's `ctx` is split back into `ctx_a`/`ctx_b`
(`split_hellaswag_ctx`) so lm-eval's own preprocessing gives its usual prompt. Deviations
forced by the local data: ARC and HellaSwag draw few-shot examples from the evaluated split itself (lm-eval never uses the current document
as its own example); TruthfulQA mc2 targets come from the CSV's answer lists.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import yaml

from ..errors import MissingFileError
from .presets import lm_eval_tasks_dir, mmlu_subjects

PREFIX = "local_"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _write_task(out: Path, name: str, include: Path, data_files: dict[str, str], **fields) -> None:
    doc = {"include": str(include), "task": name, "dataset_path": "json", "dataset_name": None,
           "dataset_kwargs": {"data_files": data_files}, **fields}
    (out / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _arc(src: Path, out: Path) -> None:
    rows = []
    for line in (src / "arc_challenge" / "test.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.append({"id": r.get("id"), "question": r["question"], "answerKey": r["answer"],
                     "choices": {"text": [o["text"] for o in r["options"]],
                                 "label": [o["label"] for o in r["options"]]}})
    data = out / "data" / "arc_challenge_test.jsonl"
    _write_jsonl(data, rows)
    _write_task(out, f"{PREFIX}arc_challenge", lm_eval_tasks_dir() / "arc" / "arc_easy.yaml",
                {"test": str(data)}, training_split=None, validation_split=None,
                test_split="test", fewshot_split="test", tag=["local_leaderboard"])


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")


def split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) of a HellaSwag context given as one string (`ctx = ctx_a + " " + ctx_b`).

    In the original dataset `ctx_b` is the unfinished last sentence the endings complete (empty
    when the context ends with a full sentence); lm-eval capitalises it, so it must be split off
    exactly for the prompt to match lm-eval's: everything after the last sentence end.
    """
    text = ctx.rstrip()
    if not text or re.search(r"[.!?][\"')\]]*$", text):
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(text))
    if not ends:
        return ctx, ""
    cut = ends[-1].end()
    return text[:cut - 1], text[cut:]


def _hellaswag(src: Path, out: Path) -> None:
    rows = []
    for line in (src / "hellaswag" / "validation.jsonl").read_text().splitlines():
        r = json.loads(line)
        ctx_a, ctx_b = ((r["ctx_a"], r["ctx_b"]) if "ctx_a" in r  # the HF dataset's own schema
                        else split_hellaswag_ctx(r["ctx"]))
        rows.append({"activity_label": r["activity_label"], "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "endings": r["endings"], "label": str(r["label"])})
    data = out / "data" / "hellaswag_validation.jsonl"
    _write_jsonl(data, rows)
    _write_task(out, f"{PREFIX}hellaswag", lm_eval_tasks_dir() / "hellaswag" / "hellaswag.yaml",
                {"validation": str(data)}, training_split=None, validation_split="validation",
                fewshot_split="validation", tag=["local_leaderboard"])


def _mmlu(src: Path, out: Path) -> None:
    for subject in mmlu_subjects():
        files = {}
        for split in ("dev", "test"):
            path = src / "mmlu" / split / f"{subject}_{split}.csv"
            with open(path, newline="", encoding="utf-8") as fh:
                rows = [{"question": q, "subject": subject, "choices": [a, b, c, d],
                         "answer": "ABCD".index(ans.strip())}
                        for q, a, b, c, d, ans in csv.reader(fh)]
            data = out / "data" / "mmlu" / f"{subject}_{split}.jsonl"
            _write_jsonl(data, rows)
            files[split] = str(data)
        _write_task(out, f"{PREFIX}mmlu_{subject}",
                    lm_eval_tasks_dir() / "mmlu" / "default" / f"mmlu_{subject}.yaml", files,
                    tag=["local_mmlu"])


def _split_answers(text: str) -> list[str]:
    seen, out = set(), []
    for a in (x.strip() for x in text.split(";")):
        if a and a not in seen:
            seen.add(a)
            out.append(a)
    return out


def _truthfulqa(src: Path, out: Path) -> None:
    rows = []
    with open(src / "truthfulqa" / "TruthfulQA.csv", newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            correct = _split_answers(r["Correct Answers"])
            best = r["Best Answer"].strip()
            if best and best not in correct:
                correct.insert(0, best)
            incorrect = _split_answers(r["Incorrect Answers"])
            rows.append({
                "question": r["Question"].strip(),
                "mc1_targets": {"choices": [best] + incorrect, "labels": [1] + [0] * len(incorrect)},
                "mc2_targets": {"choices": correct + incorrect,
                                "labels": [1] * len(correct) + [0] * len(incorrect)},
            })
    data = out / "data" / "truthfulqa_validation.jsonl"
    _write_jsonl(data, rows)
    _write_task(out, f"{PREFIX}truthfulqa_mc2",
                lm_eval_tasks_dir() / "truthfulqa" / "truthfulqa_mc2.yaml",
                {"validation": str(data)}, tag=["local_leaderboard"])


def write_local_leaderboard_tasks(benchmark_dir: str | Path, out: Path) -> Path:
    """Convert the benchmark files and write the task YAMLs into `out`; return `out`."""
    src = Path(benchmark_dir)
    if not src.is_dir():
        raise MissingFileError(f"eval.benchmark_data: {src}: folder not found")
    out.mkdir(parents=True, exist_ok=True)
    for build in (_arc, _hellaswag, _mmlu, _truthfulqa):
        try:
            build(src, out)
        except FileNotFoundError as exc:
            raise MissingFileError(f"eval.benchmark_data: {exc.filename}: file not found") from None
    return out
