"""The leaderboard_v1 preset: exact tasks/shots/metrics, offline data, unweighted MMLU mean."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fashionfuse.cli import app
from fashionfuse.evaluate.presets import leaderboard_v1, mmlu_subjects

from .conftest import SHARED

runner = CliRunner()


def test_preset_expands_to_exact_v1_settings():
    specs = leaderboard_v1()
    by_task = {s.task: s for s in specs}
    assert (by_task["arc_challenge"].num_fewshot, by_task["arc_challenge"].metric) == (25, "acc_norm,none")
    assert (by_task["hellaswag"].num_fewshot, by_task["hellaswag"].metric) == (10, "acc_norm,none")
    assert (by_task["truthfulqa_mc2"].num_fewshot, by_task["truthfulqa_mc2"].metric) == (0, "acc,none")
    mmlu = [s for s in specs if s.column == "mmlu"]
    assert len(mmlu) == 57 == len(mmlu_subjects())
    assert all(s.num_fewshot == 5 and s.metric == "acc,none" and s.task.startswith("mmlu_") for s in mmlu)
    assert len(specs) == 60
    assert {s.task for s in leaderboard_v1("local_")} == {f"local_{s.task}" for s in specs}


def _mini_benchmarks(root: Path) -> Path:
    """A tiny benchmark folder in the original schemas (synthetic text)."""
    (root / "arc_challenge").mkdir(parents=True)
    (root / "arc_challenge" / "test.jsonl").write_text("".join(json.dumps({
        "id": f"q{i}", "question": f"Which number is {i}?",
        "options": [{"label": lab, "text": str(i + k)} for k, lab in enumerate("ABCD")],
        "answer": "A"}) + "\n" for i in range(30)))
    (root / "hellaswag").mkdir()
    (root / "hellaswag" / "validation.jsonl").write_text("".join(json.dumps({
        "activity_label": "Counting", "ctx": f"She counts to {i} and then", "label": 1,
        "endings": ["stops.", "keeps counting.", "sings.", "sleeps."]}) + "\n" for i in range(30)))
    for split, n in (("dev", 5), ("test", 2)):
        (root / "mmlu" / split).mkdir(parents=True)
        for s_i, subject in enumerate(mmlu_subjects()):
            with open(root / "mmlu" / split / f"{subject}_{split}.csv", "w", newline="") as fh:
                w = csv.writer(fh)
                for i in range(n):
                    w.writerow([f"Question {i} on {subject}?", "one", "two", "three", "four",
                                "ABCD"[(i + s_i) % 4]])
    (root / "truthfulqa").mkdir()
    with open(root / "truthfulqa" / "TruthfulQA.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers",
                    "Incorrect Answers", "Source"])
        for i in range(3):
            w.writerow(["Adversarial", "Misc", f"Is {i} a number?", "Yes.", "Yes.; It is.",
                        "No.; Never.", "synthetic"])
    return root


def _run_preset(make_config, tmp_path, data: Path, limit: int) -> dict:
    path = make_config(eval={"preset": "leaderboard_v1", "benchmark_data": str(data), "tasks": [],
                             "include_paths": [], "models": ["base"], "limit": limit,
                             "batch_size": 8})
    result = runner.invoke(app, ["eval", str(path)])
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "run" / "eval" / "base" / "results.json").read_text())


def _check_table(tmp_path, results: dict) -> None:
    table = json.loads((tmp_path / "run" / "eval" / "table.json").read_text())
    assert table["columns"] == ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "average"]
    (row,) = table["rows"]
    subject_accs = [results["results"][f"local_mmlu_{s}"]["acc,none"] for s in mmlu_subjects()]
    assert len(subject_accs) == 57
    assert row["mmlu"] == round(100 * sum(subject_accs) / 57, 2)  # unweighted subject mean
    assert row["arc_challenge"] == round(100 * results["results"]["local_arc_challenge"]["acc_norm,none"], 2)
    assert row["truthfulqa_mc2"] == round(100 * results["results"]["local_truthfulqa_mc2"]["acc,none"], 2)
    assert results["n-shot"]["local_arc_challenge"] == 25
    assert results["n-shot"]["local_hellaswag"] == 10
    assert results["n-shot"]["local_mmlu_anatomy"] == 5
    assert results["n-shot"]["local_truthfulqa_mc2"] == 0


def test_preset_on_local_files_in_original_schema(make_config, tmp_path):
    results = _run_preset(make_config, tmp_path, _mini_benchmarks(tmp_path / "bench"), limit=2)
    _check_table(tmp_path, results)
    assert results["n-samples"]["local_mmlu_anatomy"]["effective"] == 2


@pytest.mark.skipif(not (SHARED / "benchmarks").is_dir(), reason="../shared/benchmarks absent")
def test_preset_on_shared_benchmark_data(make_config, tmp_path):
    results = _run_preset(make_config, tmp_path, SHARED / "benchmarks", limit=2)
    _check_table(tmp_path, results)
    assert results["n-samples"]["local_hellaswag"]["original"] == 10042
    assert results["n-samples"]["local_arc_challenge"]["original"] == 1172


def test_benchmark_data_requires_preset(make_config):
    result = runner.invoke(app, ["validate", str(make_config()), "--set", "eval.benchmark_data=/x"])
    assert result.exit_code == 2 and "benchmark_data is only used with a preset" in result.output
