"""train-adapter through the CLI: QLoRA (4-bit NF4), loadable adapters, resume from checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fashionfuse.cli import app
from fashionfuse.config import load_config
from fashionfuse.train.batching import collate, length_grouped_batches
from fashionfuse.train.trainer import train_one_adapter

runner = CliRunner()


def test_adapters_are_peft_loadable_and_learned(pipeline_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = pipeline_run["run_dir"]
    for name in ("chat", "orca"):
        d = run / "adapters" / name
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
        assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                              "up_proj", "down_proj"}
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pipeline_run["model"]), d)
        assert any("lora_B" in n for n, _ in model.named_parameters())
        b = [t for k, t in load_file(d / "adapter_model.safetensors").items() if "lora_B" in k]
        assert any(t.abs().sum() > 0 for t in b), "B matrices still zero: nothing was trained"
        history = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert [h["step"] for h in history] == [1, 2, 3, 4]
        assert all(h["tokens_per_s"] > 0 for h in history)
        assert (d / "loss.png").stat().st_size > 1000
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["stage"] == "train" and manifest["metrics"]["steps"] == 4
        assert "chat_template" in (d / "tokenizer_config.json").read_text() or (d / "chat_template.jinja").exists()


def test_training_runs_on_a_4bit_nf4_base(make_config):
    from bitsandbytes.nn import Linear4bit

    from fashionfuse.base_model import load_base_model

    cfg = load_config(make_config())
    model = load_base_model(cfg.model)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers, "base not quantised"
    q = layers[0].weight.quant_state
    assert q.quant_type == "nf4" and q.nested  # nested == double quantisation
    assert layers[0].compute_dtype == torch.bfloat16


def test_length_grouped_batches_cover_every_example_once():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47, 9, 46, 4, 45]
    batches = length_grouped_batches(lengths, micro_batch=2, seed=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(12))
    spread = sum(abs(lengths[b[0]] - lengths[b[-1]]) for b in batches)
    assert spread < 20  # short with short, long with long


def test_collate_pads_and_masks():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                     {"input_ids": [1, 4], "labels": [-100, 4]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 4, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 4, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_interrupted_training_resumes_to_the_same_adapter(make_config, tmp_path):
    from transformers import AutoTokenizer

    path = make_config(training={"max_steps": 4, "checkpoint_steps": 2, "lora": {"r": 4, "alpha": 8},
                                 "learning_rate": 5e-3, "batch_size": 8, "micro_batch_size": 4})
    assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
    cfg = load_config(path)
    tok = AutoTokenizer.from_pretrained(cfg.model.base)
    with pytest.raises(KeyboardInterrupt):
        train_one_adapter(cfg, "orca", tok, stop_after=2)
    work = tmp_path / "run" / "adapters" / ".orca.work"
    assert (work / "checkpoint" / "state.pt").exists()
    assert not (tmp_path / "run" / "adapters" / "orca").exists()  # nothing half-written
    result = runner.invoke(app, ["train-adapter", str(path), "--dataset", "orca"])
    assert result.exit_code == 0, result.output
    assert "resuming from step 2/4" in result.output
    resumed = load_file(tmp_path / "run" / "adapters" / "orca" / "adapter_model.safetensors")
    history = [json.loads(x) for x in
               (tmp_path / "run/adapters/orca/metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]

    fresh = make_config(run_dir=tmp_path / "fresh", training={
        "max_steps": 4, "checkpoint_steps": 2, "lora": {"r": 4, "alpha": 8}, "learning_rate": 5e-3,
        "batch_size": 8, "micro_batch_size": 4})
    assert runner.invoke(app, ["curate", str(fresh)]).exit_code == 0
    assert runner.invoke(app, ["train-adapter", str(fresh), "--dataset", "orca"]).exit_code == 0
    straight = load_file(tmp_path / "fresh" / "adapters" / "orca" / "adapter_model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-6)


def test_train_skips_up_to_date_adapter(pipeline_run):
    result = runner.invoke(app, ["train-adapter", str(pipeline_run["config"])])
    assert result.exit_code == 0
    assert "train chat: up to date" in result.output and "train orca: up to date" in result.output


def test_train_without_curated_data_fails_clearly(make_config):
    result = runner.invoke(app, ["train-adapter", str(make_config())])
    assert result.exit_code == 2
    assert "curated data missing" in result.output
