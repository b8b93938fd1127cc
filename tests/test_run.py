"""`fashionfuse run`: all stages in order, skipping the ones already up to date."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fashionfuse.cli import app

runner = CliRunner()


def test_run_skips_every_finished_stage(pipeline_run):
    result = runner.invoke(app, ["run", str(pipeline_run["config"])])
    assert result.exit_code == 0, result.output
    for line in ("curate chat: up to date", "train orca: up to date", "search: up to date",
                 "eval: up to date"):
        assert line in result.output


def test_every_artifact_has_a_manifest(pipeline_run):
    run = pipeline_run["run_dir"]
    for d in ("curate/chat", "curate/orca", "adapters/chat", "adapters/orca", "search", "eval"):
        m = json.loads((run / d / "manifest.json").read_text())
        assert m["fingerprint"] and m["config_hash"] and m["seed"] == 7
        assert {"torch", "transformers", "peft"} <= set(m["versions"])
    assert not list(run.rglob(".*.tmp-*")), "temporary directories left behind"
