"""`fashionfuse` as an lm-eval model: registered in lm-eval's own registry, and lm-eval's own
command line with it scores the demo's base, fused adapter and searched weights exactly as
`fashionfuse eval` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_registered_in_lm_evals_registry():
    from lm_eval.api.registry import get_model

    from fashionfuse.evaluate.lm_eval_model import FashionfuseLM

    assert get_model("fashionfuse") is FashionfuseLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models still there


def run_cli(pipeline_run, tmp_path, model_args: str, **env) -> tuple[dict, str]:
    """lm-eval's own CLI with the `fashionfuse` model on two demo tasks, the base loaded in
    4-bit as the run trained and scored it: (results, stderr)."""
    run = pipeline_run["run_dir"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fashionfuse.evaluate.lm_eval_cli", "--model", "fashionfuse",
           "--model_args", f"pretrained={pipeline_run['model']},load_in_4bit=true{model_args}",
           "--tasks", "demo_colours,demo_opposites", "--include_path", str(run / "eval_tasks"),
           "--limit", "6", "--num_fewshot", "0", "--device", "cpu", "--batch_size", "8",
           "--output_path", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(out.rglob("results_*.json")).read_text())["results"], proc.stderr


def _cli(pipeline_run, tmp_path, model_args: str) -> dict:
    return run_cli(pipeline_run, tmp_path, model_args)[0]


@pytest.mark.parametrize("row,args", [("base", ""), ("fused", ",peft={run}/search/fused"),
                                      ("fused", ",fusion={run}/search/best.json")])
def test_lm_eval_cli_scores_like_fashionfuse_eval(pipeline_run, tmp_path, row, args):
    run = pipeline_run["run_dir"]
    ours = json.loads((run / "eval" / row / "results.json").read_text())["results"]
    theirs = _cli(pipeline_run, tmp_path, args.format(run=run))
    for task in ("demo_colours", "demo_opposites"):
        for metric in ("acc,none", "acc_norm,none"):
            assert theirs[task][metric] == ours[task][metric], (task, metric)
