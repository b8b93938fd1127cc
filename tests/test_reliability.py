"""Failures lose nothing: bugs show their traceback, a full disk or a permission problem is one
line with the previous artifact intact and the run resumable, one run dir has one owner, hub
tokens never reach an artifact."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from fashionfuse.cli import app
from fashionfuse.errors import UserError
from fashionfuse.rundir import run_lock

runner = CliRunner()


def _tree_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_bug_shows_its_traceback_and_exit_1(make_config, monkeypatch):
    """A library failure (here a shape mismatch) is not dressed up as a config error."""
    import fashionfuse.cli as cli

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)")

    monkeypatch.setattr(cli, "run_stage", broken)
    result = runner.invoke(app, ["curate", str(make_config())])
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)
    assert "error:" not in result.output


def test_a_user_error_is_one_line_and_exit_2(make_config, monkeypatch):
    import fashionfuse.cli as cli

    def refuse(*args, **kwargs):
        raise UserError("adapters/x: not a PEFT adapter directory")

    monkeypatch.setattr(cli, "run_stage", refuse)
    result = runner.invoke(app, ["curate", str(make_config())])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: adapters/x: not a PEFT adapter directory"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_disk_full_or_unwritable_keeps_the_previous_artifact(code, pipeline_run, tmp_path,
                                                            monkeypatch):
    """The search's writer fails mid-way: one clear line, the previous search artifact is
    byte-identical, no temporary directory is left, and the same command finishes afterwards."""
    from fashionfuse.fusion import export as search_pipeline  # writes search/fused

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("eval*"))
    before = _tree_digest(run / "search")
    args = ["search-weights", str(pipeline_run["config"]), "--set", f"run_dir={run}", "--force"]
    real = search_pipeline.save_peft_adapter

    def failing(path, *a, **k):
        raise OSError(code, os.strerror(code), str(path / "adapter_model.safetensors"))

    monkeypatch.setattr(search_pipeline, "save_peft_adapter", failing)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert os.strerror(code) in line and "run the same command again" in line
    assert _tree_digest(run / "search") == before
    assert not list(run.glob(".search.tmp-*"))
    monkeypatch.setattr(search_pipeline, "save_peft_adapter", real)
    result = runner.invoke(app, ["search-weights", str(pipeline_run["config"]),
                                 "--set", f"run_dir={run}"])
    assert result.exit_code == 0, result.output
    assert (run / "search" / "fused" / "adapter_model.safetensors").exists()


def _hold_lock(run_dir):
    code = ("import sys, time; from fashionfuse.rundir import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_the_same_run_dir_is_refused_until_the_holder_dies(make_config, tmp_path):
    path = make_config()
    holder = _hold_lock(tmp_path / "run")
    try:
        result = runner.invoke(app, ["curate", str(path)])
        assert result.exit_code == 2
        (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
        assert f"pid {holder.pid} on " in line and "in use by" in line
        assert not (tmp_path / "run" / "curate").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    result = runner.invoke(app, ["curate", str(path)])  # the dead holder's lock is gone
    assert result.exit_code == 0, result.output


def test_shared_holders_coexist_but_exclude_an_exclusive_one(tmp_path):
    """Search workers on one storage (and the ranks of one torchrun job) share the lock."""
    with run_lock(tmp_path, shared=True), run_lock(tmp_path, shared=True):
        with pytest.raises(UserError, match="in use by"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):
        pass


def test_hub_token_never_reaches_an_artifact(make_config, tmp_path, monkeypatch):
    token = "hf_FAKEtoken0123456789abcdefFAKE"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", token)
    path = make_config(training={"batch_size": 8, "micro_batch_size": 4, "max_steps": 1,
                                 "lora": {"r": 4, "alpha": 8}})
    for stage in ("curate", "train-adapter"):
        result = runner.invoke(app, [stage, str(path)])
        assert result.exit_code == 0, result.output
        assert token not in result.output
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f


def test_yaml_tags_are_not_executed(tmp_path):
    from fashionfuse.config import ConfigError, load_config

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"run_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    time.sleep(0.1)
    assert not marker.exists()


def test_training_checkpoint_loads_as_weights_only(make_config, tmp_path):
    """Checkpoints hold tensors and plain values only (torch.load(weights_only=True))."""
    import torch
    from transformers import AutoTokenizer

    from fashionfuse.config import load_config
    from fashionfuse.train.trainer import train_one_adapter

    from .conftest import stop_after

    path = make_config(training={"max_steps": 4, "checkpoint_steps": 2, "batch_size": 8,
                                 "micro_batch_size": 4, "lora": {"r": 4, "alpha": 8}})
    assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
    cfg = load_config(path)
    with pytest.raises(KeyboardInterrupt):
        train_one_adapter(cfg, "orca", AutoTokenizer.from_pretrained(cfg.model.base),
                          progress=stop_after(2))
    state = torch.load(tmp_path / "run/adapters/.orca.work/checkpoint/state.pt", weights_only=True)
    assert state["step"] == 2


def test_every_user_facing_error_is_a_user_error():
    """The CLI reports UserErrors as one line; anything else shows its traceback. Every
    exception class fashionfuse defines, found by importing every module, is a UserError,
    except the internal ones named here with where they are caught."""
    import importlib
    import inspect
    import pkgutil

    import fashionfuse

    internal = {"fashionfuse.train.varlen_attention.UnsupportedAttention":
                "caught by use_varlen_attention: the model trains unpacked"}
    found = {}
    for info in pkgutil.walk_packages(fashionfuse.__path__, "fashionfuse."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == info.name:
                found[f"{info.name}.{name}"] = cls
    assert "fashionfuse.adapters.saved.FusionError" in found  # the walk sees the package
    for qualname, cls in found.items():
        assert issubclass(cls, UserError) or qualname in internal, qualname
    assert set(internal) <= set(found)
