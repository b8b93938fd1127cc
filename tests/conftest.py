"""Shared fixtures: a tiny Llama built once per session, demo raw data, and run configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fashionfuse.demo import build_base_model, write_eval_tasks, write_raw_sources  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama (2 layers, hidden 64, GQA) with its own BPE tokenizer, briefly pretrained."""
    return build_base_model(tmp_path_factory.mktemp("tiny") / "model", steps=30, hidden=64,
                            vocab_size=512, log_every=0)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    paths = write_raw_sources(root / "raw")
    write_eval_tasks(root / "tasks")
    paths["tasks"] = root / "tasks"
    return paths


def config_dict(run_dir: Path, model: Path, data: dict[str, Path]) -> dict:
    """A small but complete run config for the tiny model (fast on 2 CPU cores)."""
    return {
        "run_dir": str(run_dir),
        "seed": 7,
        "model": {"base": str(model), "max_input_len": 128},
        "datasets": [
            {"name": "chat", "kind": "chat", "source": {"format": "sharegpt", "path": str(data["chat"])},
             "filters": {"keep_models": ["gpt-4"]}, "max_records": 60},
            {"name": "orca", "kind": "qa", "source": {"format": "openorca", "path": str(data["orca"])},
             "max_records": 60},
        ],
        "training": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "learning_rate": 5e-3,
                     "lora": {"r": 4, "alpha": 8}, "checkpoint_steps": 2},
        "search": {"method": "grid", "grid_values": [0.0, 1.0],
                   "objective": {"max_samples_per_dataset": 6}, "batch_size": 6},
        "eval": {"tasks": ["demo_colours", "demo_opposites"], "include_paths": [str(data["tasks"])],
                 "limit": 6, "batch_size": 8, "num_fewshot": 0},
    }


@pytest.fixture
def make_config(tmp_path, tiny_model, demo_data):
    """Write a config YAML (with optional section updates) and return its path."""

    def make(run_dir: Path | None = None, **updates) -> Path:
        data = config_dict(run_dir or tmp_path / "run", tiny_model, demo_data)
        for key, value in updates.items():
            data[key] = value if not isinstance(value, dict) else {**data.get(key, {}), **value}
        path = tmp_path / f"config-{len(list(tmp_path.glob('config-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


@pytest.fixture
def float32_trainable(make_config):
    """A factory of the trainable QLoRA model of `make_config()` with float32 compute, where two
    routes that compute one function can be compared (bfloat16 rounds their different orders of
    additions differently, on CPUs where `auto` resolves to it), and every LoRA B drawn from
    N(0, 0.05) so the adapter contributes (PEFT starts B at zero). `build_seed`: the torch seed
    before building, `init_seed`: before drawing B; `training`: training-section updates."""
    import torch

    from fashionfuse.config import RunConfig, load_config
    from fashionfuse.train.model import build_trainable_model

    def build(init_seed: int = 0, build_seed: int | None = None, **training):
        data = load_config(make_config()).model_dump(mode="json")
        data["model"]["quantization"]["compute_dtype"] = "float32"
        data["training"].update(training)
        cfg = RunConfig.model_validate(data)
        if build_seed is not None:
            torch.manual_seed(build_seed)
        model = build_trainable_model(cfg.model, cfg.training, device="cpu",
                                      log=lambda *a: None).model
        torch.manual_seed(init_seed)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        return model

    return build


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, tiny_model, demo_data):
    """The whole pipeline run once through the CLI; tests inspect its artifacts."""
    from typer.testing import CliRunner

    from fashionfuse.cli import app

    root = tmp_path_factory.mktemp("pipeline")
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(root / "run", tiny_model, demo_data)))
    runner = CliRunner()
    outputs = {}
    for stage in ("curate", "train-adapter", "search-weights", "eval"):
        result = runner.invoke(app, [stage, str(cfg)])
        assert result.exit_code == 0, f"{stage} failed:\n{result.output}\n{result.exception!r}"
        outputs[stage] = result.output
    return {"config": cfg, "run_dir": root / "run", "outputs": outputs, "model": tiny_model}


def stop_after(n: int):
    """A progress callback that interrupts a stage (like Ctrl-C) after `n` finished units."""

    def progress(done: int) -> None:
        if done >= n:
            raise KeyboardInterrupt(f"stopped after {done} (test)")

    return progress


def logits_with(base, adapter_dir=None, deltas=None, ids=None):
    """Float32 logits of `base` on a fixed row of token ids, with dense `deltas` (module key ->
    update) added to its weights and/or the PEFT adapter in `adapter_dir` loaded on top."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = ids if ids is not None else torch.tensor([[1, 5, 9, 33, 70, 2, 11, 40]])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if deltas:
        with torch.no_grad():
            for key, d in deltas.items():
                model.get_submodule(key.removeprefix("base_model.model.")).weight += d.float()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        return model(ids).logits
