"""eval through the CLI and through lm-eval's own CLI on the fused adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fashionfuse.config import load_config
from fashionfuse.evaluate.presets import custom_specs
from fashionfuse.evaluate.table import build_table, to_markdown


def test_eval_writes_results_and_table_for_every_model(pipeline_run):
    ev = pipeline_run["run_dir"] / "eval"
    table = json.loads((ev / "table.json").read_text())
    assert [r["model"] for r in table["rows"]] == ["base", "adapter:chat", "adapter:orca", "fused"]
    assert table["columns"] == ["demo_colours", "demo_opposites", "average"]
    for label in ("base", "adapter_chat", "adapter_orca", "fused"):
        res = json.loads((ev / label / "results.json").read_text())
        assert res["results"]["demo_colours"]["alias"] == "demo_colours"
        assert 0.0 <= res["results"]["demo_colours"]["acc_norm,none"] <= 1.0
        assert res["n-samples"]["demo_colours"]["effective"] == 6
    md = (ev / "table.md").read_text()
    assert "**" in md and (ev / "table.csv").exists() and (ev / "table.png").stat().st_size > 1000


def test_models_see_different_weights(pipeline_run):
    """Each eval label switches the resident model to its own weights: base, each adapter and
    the fused adapter give different logits (scores on 6 examples may tie, logits do not)."""
    import torch

    from fashionfuse.base_model import load_base_model
    from fashionfuse.evaluate.harness import activate, adapter_keys, models_to_evaluate
    from fashionfuse.adapters.runtime import attach_adapters

    cfg = load_config(pipeline_run["config"])
    models = models_to_evaluate(cfg)
    keys = adapter_keys(models)
    model = attach_adapters(load_base_model(cfg.model, device="cpu"),
                            {keys[label]: models[label] for label in keys})
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 2]])
    logits = {}
    for label in models:
        activate(model, keys.get(label), list(keys.values()))
        with torch.no_grad():
            logits[label] = model(input_ids=ids).logits
    labels = list(logits)
    assert labels == ["base", "adapter:chat", "adapter:orca", "fused"]
    best = json.loads((pipeline_run["run_dir"] / "search" / "best.json").read_text())["best_weights"]
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if b == "fused" and best == {n: float(f"adapter:{n}" == a) for n in best}:
                # the search picked this adapter alone: fused is exactly it
                torch.testing.assert_close(logits[a], logits[b])
            else:
                assert (logits[a] - logits[b]).abs().max() > 1e-4, (a, b)


def test_table_marks_best_per_column():
    results = {
        "a": {"results": {"t1": {"acc_norm,none": 0.5}, "t2": {"acc,none": 0.9}}},
        "b": {"results": {"t1": {"acc_norm,none": 0.7}, "t2": {"acc,none": 0.1}}},
    }
    table = build_table(results, custom_specs(["t1", "t2"], None))
    assert table["best"] == {"t1": ["b"], "t2": ["a"], "average": ["a"]}
    md = to_markdown(table)
    assert "| a | 50.00 | **90.00** | **70.00** |" in md
    assert "| b | **70.00** | 10.00 | 40.00 |" in md


def test_standard_error_of_each_cell_from_the_items():
    """A task's cell: sd / sqrt(n) of its items; a column of several tasks (MMLU's subjects)
    and `average`: sqrt(sum of squares) / k; a task with one item has none."""
    from fashionfuse.evaluate.presets import TaskSpec
    from fashionfuse.evaluate.table import standard_errors, stderr_markdown

    specs = [TaskSpec("s1", 0, "acc,none", "subjects"), TaskSpec("s2", 0, "acc,none", "subjects"),
             TaskSpec("t", 0, "acc,none", "t")]
    items = {"s1": {"0": 1.0, "1": 0.0, "2": 1.0, "3": 0.0},  # sd 0.5774, n 4: se 28.87
             "s2": {"0": 1.0, "1": 1.0},                       # sd 0: se 0
             "t": {"0": 0.25, "1": 0.75}}                      # sd 0.3536, n 2: se 25.0
    results = {"m": {"results": {k: {"acc,none": sum(v.values()) / len(v)} for k, v in
                                 items.items()}, "items": items},
               "one": {"results": {"t": {"acc,none": 1.0}}, "items": {"t": {"0": 1.0}}}}
    table = build_table(results, specs)
    table["stderr"] = errors = standard_errors(table, results, specs)
    assert errors["m"]["t"] == 25.0
    assert errors["m"]["subjects"] == round((28.8675 ** 2 + 0.0) ** 0.5 / 2, 2)
    assert errors["m"]["average"] == round((errors["m"]["subjects"] ** 2 + 25.0 ** 2) ** 0.5 / 2, 2)
    assert errors["one"]["t"] is None and errors["one"]["average"] is None
    assert "| m | 14.43 | 25.00 | 14.43 |" in stderr_markdown(table)


def test_table_heatmap_stays_legible_with_many_variants(tmp_path):
    """The chart of an ablation (15 variants, missing cells, group means) is one heatmap whose
    size grows with the rows and stays within the report's width at its resolution."""
    from PIL import Image

    from fashionfuse.evaluate.table import plot_table

    cols = ["arc", "hellaswag", "mmlu", "truthfulqa", "skill", "retention", "average"]
    rows = [{"model": f"variant {i}", **{c: (None if (i, c) == (3, "mmlu") else 30 + (i * 7 + j) % 40)
                                         for j, c in enumerate(cols)}} for i in range(15)]
    table = {"columns": cols, "rows": rows, "best": {"arc": ["variant 2"]},
             "summary": ["skill", "retention", "average"]}
    plot_table(table, tmp_path / "t.png")
    width, height = Image.open(tmp_path / "t.png").size
    assert width <= 1000 and height >= 15 * 30  # ~a text line per variant, no downscaling


def test_data_parallel_eval_on_two_cpu_processes(pipeline_run, tmp_path):
    """torchrun x2 (gloo on CPU, also where a GPU is visible): requests sharded over ranks, rank
    0 writes the table. With `batch_size: auto` each process sizes its batches for its own
    row lengths without a collective (lm-eval's detection gathers across processes once per
    call; processes with different lengths would wait on each other forever)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("eval*"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               FASHIONFUSE_DIST_BACKEND="gloo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", "-m", "fashionfuse.cli", "eval", str(pipeline_run["config"]),
           "--set", f"run_dir={run}", "--set", "eval.batch_size=auto"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "processes=2" in proc.stdout
    manifest = json.loads((run / "eval" / "manifest.json").read_text())
    assert manifest["processes"] == 2
    single = json.loads((pipeline_run["run_dir"] / "eval" / "table.json").read_text())
    parallel = json.loads((run / "eval" / "table.json").read_text())
    assert [r["model"] for r in parallel["rows"]] == [r["model"] for r in single["rows"]]
    for a, b in zip(single["rows"], parallel["rows"]):
        for col in single["columns"]:
            assert abs(a[col] - b[col]) <= 100 / 6 + 1e-6  # at most one of 6 answers flips
    res = json.loads((run / "eval" / "fused" / "results.json").read_text())
    assert res["n-samples"]["demo_colours"]["effective"] == 6  # every example scored once


def test_fused_adapter_loads_in_lm_eval_cli(pipeline_run, tmp_path):
    run = pipeline_run["run_dir"]
    tasks = sorted((run / "eval_tasks").iterdir())[0]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={pipeline_run['model']},peft={run / 'search' / 'fused'}",
           "--tasks", "demo_colours", "--include_path", str(tasks), "--limit", "4",
           "--device", "cpu", "--batch_size", "4", "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list(out.rglob("results_*.json"))
    assert results, proc.stdout[-2000:]
    data = json.loads(results[0].read_text())
    assert "acc_norm,none" in data["results"]["demo_colours"]
    assert str(data["config"]["model_args"]["peft"]).endswith("search/fused")


def test_merged_model_is_evaluated_beside_the_adapters(pipeline_run, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from fashionfuse.cli import app

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("search*", "eval*"))
    cfg = str(pipeline_run["config"])
    runner = CliRunner()
    res = runner.invoke(app, ["search-weights", cfg, "--set", f"run_dir={run}",
                              "--set", "search.export_merged=true"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", cfg, "--set", f"run_dir={run}",
                              "--set", "eval.models=[fused, merged]"])
    assert res.exit_code == 0, res.output
    table = json.loads((run / "eval" / "table.json").read_text())
    rows = {r["model"]: r for r in table["rows"]}
    assert set(rows) == {"fused", "merged"}
    assert (run / "eval" / "merged" / "results.json").exists()
    # merged (bf16, dequantised NF4 + delta) and fused (4-bit + adapter) score alike
    for col in ("demo_colours", "demo_opposites"):
        assert abs(rows["fused"][col] - rows["merged"][col]) <= 100 / 6 + 1e-6


def test_tasks_loaded_once_score_like_a_fresh_simple_evaluate(pipeline_run, tmp_path):
    """`TaskSet` (tasks and few-shot samplers built once, reused for every model) gives every
    model exactly the results of its own `simple_evaluate` call, few-shot prompts included."""
    from fashionfuse.base_model import load_base_model, load_tokenizer
    from fashionfuse.evaluate.lm_eval_run import (
        TaskSet,
        prepare_include_paths,
        run_tasks,
        task_manager,
        wrap_model,
    )
    from fashionfuse.adapters.runtime import attach_adapters, set_fusion_weights

    cfg = load_config(pipeline_run["config"])
    run = pipeline_run["run_dir"]
    tasks = ["demo_colours", "demo_opposites"]
    manager = task_manager(prepare_include_paths(cfg.eval.include_paths, tmp_path / "t"), tasks)
    model = attach_adapters(load_base_model(cfg.model, device="cpu"),
                            {n: run / "adapters" / n for n in ("chat", "orca")})
    lm = wrap_model(model, load_tokenizer(cfg.model), 8)
    once = TaskSet(manager, tasks, num_fewshot=2, seed=3)
    scored = []
    for weights in ({"chat": 1.0, "orca": 0.0}, {"chat": 0.0, "orca": 1.0}):
        set_fusion_weights(model, weights)
        shared = once.score(lm, limit=6, log_samples=True)  # the 2nd reuses prompts and ids
        scored.append([s["resps"] for t in tasks for s in shared["samples"][t]])
        fresh = run_tasks(lm, tasks, manager, num_fewshot=2, limit=6, seed=3, log_samples=True)
        assert shared["results"] == fresh["results"]
        for t in tasks:
            prompts = [s["arguments"] for s in shared["samples"][t]]
            assert prompts == [s["arguments"] for s in fresh["samples"][t]]
            first = prompts[0][0]  # [context, continuation] of the first choice
            context = first[0] if isinstance(first, (list, tuple)) else first["arg_0"]
            assert context.count("ASSISTANT:") == 3  # two shots, then the question
    assert scored[0] != scored[1]  # each model's own responses, none left over from the first


def test_logits_only_where_scored_match_full_logits(tiny_model):
    """The wrapped HFLM projects to the vocabulary only the trailing positions a batch's
    continuations need, and returns the log-likelihoods and greedy flags of lm-eval's own
    full-logits path: multi-token continuations, rows of different lengths in one batch, a row
    ending in the pad id 0, and a context longer than the model (truncated from the left)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fashionfuse.evaluate.lm_eval_run import wrap_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    wrapped = wrap_model(model, tokenizer, 4)
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()

    requests = [(None, ids(n), ids(c)) for n, c in ((40, 1), (37, 5), (12, 3), (25, 1), (9, 7))]
    requests.append((None, ids(20) + [0, 0], [0]))  # the pad id inside a real row
    requests.append((None, ids(20), ids(2) + [0]))
    requests.append((None, ids(plain.max_length + 30), ids(4)))
    kept = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: kept.append(o.shape[1]))
    try:
        expected = plain._loglikelihood_tokens(requests, disable_tqdm=True)
        full = list(kept)
        kept.clear()
        got = wrapped._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        hook.remove()
    assert [flag for _, flag in got] == [flag for _, flag in expected]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-4)
    # each batch keeps its longest padding plus continuation: fewer positions than its length
    assert len(kept) == len(full) and all(k < f for k, f in zip(kept, full))


def test_retention_block_scores_its_tasks_with_their_own_limit(pipeline_run, tmp_path):
    """`eval.retention`: its tasks form the table's retention group, run with their own shots
    and limit, and each model gets its retention minus the base's."""
    import shutil

    from typer.testing import CliRunner

    from fashionfuse.cli import app

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("eval*"))
    res = CliRunner().invoke(app, ["eval", str(pipeline_run["config"]), "--set", f"run_dir={run}",
                                   "--set", "eval.models=[base, fused]",
                                   "--set", "eval.retention={tasks: [demo_sounds], limit: 3}"])
    assert res.exit_code == 0, res.output
    table = json.loads((run / "eval" / "table.json").read_text())
    assert table["columns"] == ["demo_colours", "demo_opposites", "demo_sounds", "skill",
                                "retention", "average", "retention vs base"]
    rows = {r["model"]: r for r in table["rows"]}
    assert rows["base"]["retention vs base"] == 0.0
    fused = rows["fused"]
    assert fused["retention vs base"] == round(fused["retention"] - rows["base"]["retention"], 2)
    assert fused["retention"] == fused["demo_sounds"]
    assert fused["average"] == round((fused["skill"] + fused["retention"]) / 2, 2)
    results = json.loads((run / "eval" / "fused" / "results.json").read_text())
    assert results["n-samples"]["demo_sounds"]["effective"] == 3  # its own limit
    assert results["n-samples"]["demo_colours"]["effective"] > 3  # eval.limit (none) for the rest


def test_each_model_is_scored_once_per_settings_and_an_eval_resumes(pipeline_run, tmp_path,
                                                                    monkeypatch):
    """The per-model cache (`eval.cache/`): an eval stopped after its first model resumes
    after it, and another eval with the same settings (another list of models, as ablate's)
    reuses the models scored before, with the same results."""
    import shutil

    from typer.testing import CliRunner

    from fashionfuse.cli import app
    from fashionfuse.config import load_config
    from fashionfuse.evaluate import harness

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("eval*"))
    cfg = load_config(pipeline_run["config"], [f"run_dir={run}", "eval.models=[base, fused]"])
    real_score, scored = harness._score_model, []

    def stop_at_second(cfg, ev, label, path):
        if scored:
            raise KeyboardInterrupt
        scored.append(label)
        return real_score(cfg, ev, label, path)

    monkeypatch.setattr(harness, "_score_model", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        harness.evaluate(cfg)
    assert not (run / "eval").exists() and len(list((run / "eval.cache").glob("*.json"))) == 1
    monkeypatch.setattr(harness, "_score_model", real_score)
    res = CliRunner().invoke(app, ["eval", str(pipeline_run["config"]), "--set", f"run_dir={run}",
                                   "--set", "eval.models=[base, fused]"])
    assert res.exit_code == 0, res.output
    assert "eval base: scored before" in res.output and "eval fused: scored before" not in res.output
    first = json.loads((run / "eval" / "base" / "results.json").read_text())
    res = CliRunner().invoke(app, ["eval", str(pipeline_run["config"]), "--set", f"run_dir={run}",
                                   "--set", "eval.models=[base, adapters]"])
    assert res.exit_code == 0, res.output
    assert "eval base: scored before" in res.output
    assert "eval adapter:chat: scored before" not in res.output
    assert json.loads((run / "eval" / "base" / "results.json").read_text()) == first
