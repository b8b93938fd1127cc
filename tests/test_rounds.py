"""Iterative fusion (Table 6): round 2 trains and searches on the base with round 1's fused
adapter merged in."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from fashionfuse.cli import app
from fashionfuse.config import load_config

runner = CliRunner()


def test_two_rounds_merge_round_one_into_round_two_base(make_config, tmp_path):
    from peft import PeftModel

    from fashionfuse.base_model import load_base_model

    path = make_config(rounds=[{"adapters": ["chat"]}, {"adapters": ["orca"]}],
                       model={"quantization": {"bits": 16, "compute_dtype": "float32"}},
                       search={"method": "grid", "grid_values": [0.5, 1.0],
                               "objective": {"max_samples_per_dataset": 6}, "batch_size": 6})
    cfg = load_config(path)
    assert cfg.rounds
    result = runner.invoke(app, ["curate", str(path)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["search-weights", str(path)])
    assert result.exit_code == 2 and "pass --round N (1..2)" in result.output
    for k in (1, 2):
        for stage in ("train-adapter", "search-weights"):
            result = runner.invoke(app, [stage, str(path), "--round", str(k)])
            assert result.exit_code == 0, f"{stage} round {k}: {result.output}"
    run = tmp_path / "run" / "rounds"
    r1, r2 = run / "round-1", run / "round-2"
    assert (r1 / "adapters" / "chat").is_dir() and not (r1 / "adapters" / "orca").exists()
    assert (r2 / "adapters" / "orca").is_dir() and not (r2 / "adapters" / "chat").exists()
    s1 = json.loads((r1 / "search" / "best.json").read_text())
    s2 = json.loads((r2 / "search" / "best.json").read_text())
    assert set(s1["best_weights"]) == {"chat"} and set(s2["best_weights"]) == {"orca"}
    assert s1["n_trials"] == 2 and s2["n_trials"] == 2

    # round 2's base is the plain base with round 1's fused adapter merged in (exact in bf16/fp32)
    r2cfg = load_config(path).round_config(1)
    assert r2cfg.model.merge_adapters == [str(r1 / "search" / "fused")]
    plain_cfg = load_config(path)
    merged = load_base_model(r2cfg.model, device="cpu")
    reference = PeftModel.from_pretrained(load_base_model(plain_cfg.model, device="cpu"),
                                          str(r1 / "search" / "fused")).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        want = reference(input_ids=ids).logits
        plain = load_base_model(plain_cfg.model, device="cpu")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # round 1 really changed the base

    # round 2's adapter was trained on that base: its manifest records the merged adapter
    manifest = json.loads((r2 / "adapters" / "orca" / "manifest.json").read_text())
    assert manifest["stage"] == "train"
    fp_plain = load_config(path)
    from fashionfuse.train.trainer import train_fingerprint

    assert manifest["fingerprint"] == train_fingerprint(r2cfg, "orca")
    assert manifest["fingerprint"] != train_fingerprint(fp_plain, "orca")
