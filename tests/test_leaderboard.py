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


# Original-schema rows (ctx_a, ctx_b as in the HF dataset), written for this test.
_HELLASWAG_ORIGINALS = [
    ("Kayaking", "A woman paddles a kayak across a lake. She waves at the camera.", "then, she"),
    ("Cooking", "A chef slices onions on a board.", "the chef named Bob"),
    ("Walking the dog", "A man walks a dog in a park! The dog barks.", "a second dog"),
    ("Tying a tie", "How to tie a tie. Drape the tie around your neck. Keep the wide end long.", ""),
    ("Juggling", 'A boy says "watch this." He throws three balls.', "he"),
    ("Painting", "Two kids paint a fence? No, they paint a wall.", "the girl"),
    ("Rowing", "A team rows a boat on a river.", "they"),
    ("Skiing", "A skier goes down a slope. The skier turns left (carefully).", "the skier"),
    ("Baking", "A man [title] puts dough in an oven.", "he"),
    ("Surfing", "A surfer rides a wave. Another surfer paddles out.", "both surfers"),
    ("Knitting", "How to knit a scarf. Choose a soft yarn.", ""),
]


def test_hellaswag_prompts_equal_lm_evals_on_the_original_schema():
    """The local converter only has `ctx`; splitting it back must give lm-eval's own prompt,
    which capitalises ctx_b ('...roof. he' -> '...roof. He')."""
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    from fashionfuse.evaluate.benchmarks import split_hellaswag_ctx

    originals, converted = [], []
    for label, ctx_a, ctx_b in _HELLASWAG_ORIGINALS:
        endings = ["ends here.", "goes on.", "stops.", "falls."]
        originals.append({"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b,
                          "endings": endings, "label": "0"})
        a, b = split_hellaswag_ctx(f"{ctx_a} {ctx_b}" if ctx_b else ctx_a)
        converted.append({"activity_label": label, "ctx_a": a, "ctx_b": b, "endings": endings,
                          "label": "0"})
    want = process_docs(datasets.Dataset.from_list(originals))["query"]
    got = process_docs(datasets.Dataset.from_list(converted))["query"]
    assert got == want
    assert "Kayaking: A woman paddles a kayak across a lake. She waves at the camera. Then, she" in got


@pytest.mark.skipif(not (SHARED / "benchmarks" / "hellaswag").is_dir(), reason="no ../shared")
def test_hellaswag_split_is_lossless_on_shared_data():
    from fashionfuse.evaluate.benchmarks import split_hellaswag_ctx

    rows = [json.loads(x) for x in
            (SHARED / "benchmarks" / "hellaswag" / "validation.jsonl").read_text().splitlines()]
    capitalised = 0
    for r in rows:
        a, b = split_hellaswag_ctx(r["ctx"])
        assert (f"{a} {b}" if b else a) == r["ctx"].rstrip()
        capitalised += b[:1].islower()
    assert capitalised > 3000  # about a third of the items get lm-eval's capital letter


def test_preset_tasks_and_their_own_limit(make_config, tmp_path):
    """`eval.preset_tasks` keeps some of the preset's columns; `eval.preset_limit` sizes them
    apart from `eval.limit`."""
    path = make_config(eval={"preset": "leaderboard_v1", "preset_tasks": ["hellaswag",
                             "truthfulqa_mc2"], "preset_limit": 2, "models": ["base"],
                             "benchmark_data": str(_mini_benchmarks(tmp_path / "bench")),
                             "tasks": [], "include_paths": [], "batch_size": 8})
    result = runner.invoke(app, ["eval", str(path)])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "run" / "eval" / "table.json").read_text())
    assert table["columns"] == ["hellaswag", "truthfulqa_mc2", "average"]
    results = json.loads((tmp_path / "run" / "eval" / "base" / "results.json").read_text())
    assert {t: n["effective"] for t, n in results["n-samples"].items()} == {
        "local_hellaswag": 2, "local_truthfulqa_mc2": 2}
    bad = runner.invoke(app, ["validate", str(path), "--set", "eval.preset_tasks=[arc]"])
    assert bad.exit_code == 2 and "eval.preset_tasks" in bad.output

    per_column = runner.invoke(app, ["eval", str(path), "--set", "eval.preset_tasks=null",
                                     "--set", "eval.preset_limit={hellaswag: 3, mmlu: 1}",
                                     "--set", "eval.limit=2"])
    assert per_column.exit_code == 0, per_column.output
    results = json.loads((tmp_path / "run" / "eval" / "base" / "results.json").read_text())
    effective = {t: n["effective"] for t, n in results["n-samples"].items()}
    assert effective["local_hellaswag"] == 3 and effective["local_mmlu_anatomy"] == 1
    assert effective["local_arc_challenge"] == 2  # eval.limit for a column left out
