"""The third correctness audit (issue 34): each defect, reproduced on the tiny model.

Items tested elsewhere: 1 (mix shares count supervised tokens) in `test_mixing.py` and
`test_ablate.py`; 2 (TensorBoard's float32 scalars) in `test_report.py`; 3 (every README bench
mode runs) in `test_benches.py`; 8 (`adapters/summary.json` keeps every adapter) in
`test_ablate.py`.

4. an unknown lm-eval task name, or no eval task at all, is refused at validation;
5. `ablate`'s validation-loss fallback drops the objective's retention term;
6. retention shots default to the section's shots;
7. the greedy fast path honours the model's `generation_config.max_new_tokens`;
9. a killed `fashionfuse curate` takes its worker processes with it;
10. the README says how much the demo's figures move with the CPU;
11./12. lm-eval's CLI with `--model fashionfuse` loads what `--model hf` loads, without
    `--device` on a CPU-only machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fashionfuse.cli import app
from fashionfuse.config import load_config

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- 4
def test_a_misspelt_task_is_refused_at_validation_with_the_closest_names(make_config, tmp_path):
    run = tmp_path / "never"
    cfg = make_config(run_dir=run)
    res = runner.invoke(app, ["run", str(cfg), "--set", "eval.tasks=[arc_challange, demo_colours]",
                              "--set", "eval.retention={tasks: [demo_filer]}"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert any("eval.tasks: 'arc_challange': not an lm-eval task" in line
               and "did you mean arc_challenge" in line for line in lines), res.output
    assert any("eval.retention.tasks: 'demo_filer'" in line and "demo_filler" in line
               for line in lines), res.output  # every problem in one pass
    assert not run.exists()  # nothing written
    res = runner.invoke(app, ["validate", str(cfg), "--set",
                              "search.objective.tasks=[demo_colors]"])
    assert res.exit_code == 2 and "search.objective.tasks: 'demo_colors'" in res.output


def test_run_without_any_eval_task_is_refused_before_training(make_config, tmp_path):
    run = tmp_path / "never"
    cfg = make_config(run_dir=run)
    res = runner.invoke(app, ["run", str(cfg), "--set", "eval.tasks=[]"])
    assert res.exit_code == 2 and "eval: no tasks configured" in res.output, res.output
    assert not run.exists()
    res = runner.invoke(app, ["validate", str(cfg), "--set", "eval.tasks=[]"])
    assert res.exit_code == 2 and "eval: no tasks configured" in res.output
    assert runner.invoke(app, ["validate", str(cfg)]).exit_code == 0


# --------------------------------------------------------------------------- 5
def test_ablate_fallback_to_validation_loss_drops_the_retention_term(pipeline_run):
    from fashionfuse.experiments.ablate import check_fusion_variants, fusion_variants

    tasks = load_config(pipeline_run["config"]).eval.include_paths[0]
    cfg = load_config(pipeline_run["config"], [
        "search.objective.type=lm_eval", "search.objective.tasks=[demo_colours]",
        f"search.objective.include_paths=[{tasks}]", "search.objective.allow_test_split=true",
        "search.objective.retention={tasks: [demo_filler], weight: 0.5}"])
    planned = fusion_variants(cfg)
    check_fusion_variants(cfg, planned)  # raised "retention ... refused on val_loss" before
    learned = [v for v in planned if v.folder == "gradient"]
    assert learned and learned[0].search["objective"]["retention"] is None
    assert learned[0].label == "fusion, learned (gradient on validation loss, no retention term)"


# --------------------------------------------------------------------------- 6
def test_retention_shots_default_to_the_sections_shots(pipeline_run, tmp_path):
    from fashionfuse.evaluate.harness import task_specs
    from fashionfuse.search.objectives import TaskScores

    tasks = load_config(pipeline_run["config"]).eval.include_paths[0]
    cfg = load_config(pipeline_run["config"], [
        "search.objective.type=lm_eval", "search.objective.tasks=[demo_colours]",
        f"search.objective.include_paths=[{tasks}]", "search.objective.allow_test_split=true",
        "search.objective.num_fewshot=2", "search.objective.retention={tasks: [demo_filler]}",
        "eval.num_fewshot=3", "eval.retention={tasks: [demo_filler]}",
        f"run_dir={tmp_path / 'run'}"])
    assert TaskScores(cfg, None, retention=True).num_fewshot == 2
    assert {s.task: s.num_fewshot for s in task_specs(cfg)}["demo_filler"] == 3
    own = load_config(pipeline_run["config"], [
        "search.objective.type=lm_eval", "search.objective.tasks=[demo_colours]",
        f"search.objective.include_paths=[{tasks}]", "search.objective.allow_test_split=true",
        "search.objective.num_fewshot=2",
        "search.objective.retention={tasks: [demo_filler], num_fewshot: 1}",
        f"run_dir={tmp_path / 'run'}"])
    assert TaskScores(own, None, retention=True).num_fewshot == 1


# --------------------------------------------------------------------------- 7
def test_greedy_path_honours_the_models_max_new_tokens(tiny_model):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fashionfuse.evaluate.lm_eval_run import wrap_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model.generation_config.max_new_tokens = 5
    requests = [Instance(request_type="generate_until", doc={},
                         arguments=(p, {"until": ["\n\n\n"], "max_gen_toks": 20,
                                        "do_sample": False}), idx=0)
                for p in ("The weather today is", "Alice likes", "A cow says")]
    reference = HFLM(pretrained=model, tokenizer=tok, batch_size=1).generate_until(requests)
    ours = wrap_model(model, tok, 8).generate_until(requests)
    assert ours == reference
    assert all(len(tok(text, add_special_tokens=False)["input_ids"]) <= 6 for text in ours)


# --------------------------------------------------------------------------- 9
def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_a_killed_curate_takes_its_workers_with_it(make_config, tmp_path):
    raw = tmp_path / "big.jsonl"
    with open(raw, "w") as fh:
        for i in range(40000):
            fh.write(json.dumps({"id": f"r{i}", "conversations": [
                {"from": "human", "value": f"Question number {i} about the colour of item {i}?"},
                {"from": "gpt", "value": f"Item {i} is painted in a colour numbered {i * 7}."}]})
                     + "\n")
    cfg = make_config()
    data = __import__("yaml").safe_load(cfg.read_text())
    data["datasets"] = [{"name": "big", "kind": "chat",
                         "source": {"format": "sharegpt", "path": str(raw)}}]
    data["curate"] = {"num_proc": 2, "shard_size": 500}
    cfg.write_text(__import__("yaml").safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "fashionfuse.cli", "curate", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while time.monotonic() < deadline and len(workers) < 2 and proc.poll() is None:
            time.sleep(0.2)
            workers = _children(proc.pid)
        assert len(workers) >= 2, "the workers never started"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
            time.sleep(0.2)
        alive = [w for w in workers if Path(f"/proc/{w}/stat").exists()
                 and Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        assert not alive, f"workers {alive} outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()


# --------------------------------------------------------------------------- 10
def test_the_docs_say_how_the_demo_figures_move_with_the_cpu():
    text = (ROOT / "docs" / "results.md").read_text()
    assert "vary with the CPU" in text and "AVX2" in text


# --------------------------------------------------------------------------- 11 and 12
def _lm_eval(model: str, checkpoint: Path, tasks_dir: Path, out: Path) -> tuple[dict, str]:
    cmd = [sys.executable, "-m", "fashionfuse.evaluate.lm_eval_cli", "--model", model,
           "--model_args", f"pretrained={checkpoint},dtype=float32",
           "--tasks", "demo_colours,demo_opposites", "--include_path", str(tasks_dir),
           "--limit", "8", "--num_fewshot", "0", "--batch_size", "4", "--output_path", str(out)]
    # no --device: HFLM's default is cuda, which a CPU-only machine does not have
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(out.rglob("results_*.json")).read_text())["results"], proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_lm_eval_cli_fashionfuse_loads_what_hf_loads(pipeline_run, tmp_path):
    tasks_dir = sorted((pipeline_run["run_dir"] / "eval_tasks").iterdir())[0]
    ours, stderr = _lm_eval("fashionfuse", pipeline_run["model"], tasks_dir, tmp_path / "ours")
    theirs, _ = _lm_eval("hf", pipeline_run["model"], tasks_dir, tmp_path / "hf")
    assert "(unquantised, float32) on cpu" in stderr  # says what it loaded
    for task in ("demo_colours", "demo_opposites"):
        for metric in ("acc,none", "acc_norm,none"):
            assert ours[task][metric] == theirs[task][metric], (task, metric)


def test_lm_eval_cli_refuses_loading_arguments_it_would_ignore(tiny_model):
    from fashionfuse.errors import UserError
    from fashionfuse.evaluate.lm_eval_model import FashionfuseLM

    with pytest.raises(UserError, match="parallelize: not supported by --model fashionfuse"):
        FashionfuseLM(pretrained=str(tiny_model), parallelize="True")
    with pytest.raises(UserError, match="give one of them"):
        FashionfuseLM(pretrained=str(tiny_model), dtype="float32", compute_dtype="bfloat16")
