"""A calm console: fashionfuse's lines on the terminal, third-party logs in RUN_DIR/logs/."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from fashionfuse.cli import app

runner = CliRunner()


def test_third_party_notices_go_to_the_stage_log(pipeline_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run)
    args = ["eval", str(pipeline_run["config"]), "--set", f"run_dir={run}", "--force"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    log = (run / "logs" / "eval.log").read_text()
    notice = "Building contexts for demo_colours"  # lm-eval's per-task notice
    assert notice in log and notice not in result.output
    assert "Running loglikelihood requests" not in result.output  # lm-eval's own progress bar
    assert "eval base:" in result.output and f"third-party logs in {run / 'logs' / 'eval.log'}" \
        in result.output
    verbose = runner.invoke(app, ["-v", *args])
    assert verbose.exit_code == 0 and notice in verbose.output


def test_quiet_and_json_output(make_config, tmp_path):
    path = str(make_config())
    quiet = runner.invoke(app, ["-q", "curate", path])
    assert quiet.exit_code == 0
    lines = [x for x in quiet.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("curate: done in")
    assert "curate chat: read" in (tmp_path / "run" / "logs" / "curate.log").read_text()
    js = runner.invoke(app, ["--log-format", "json", "curate", path, "--force"])
    assert js.exit_code == 0
    records = [json.loads(x) for x in js.output.splitlines() if x.strip()]
    assert records and all(r["command"] == "curate" for r in records)
    assert any(r["message"].startswith("curate chat: read") for r in records)
    bad = runner.invoke(app, ["--log-format", "xml", "curate", path])
    assert bad.exit_code == 2 and "--log-format" in bad.output
