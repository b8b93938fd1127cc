"""Fault injection: `fashionfuse run` is killed (SIGKILL) at a seeded random point inside a stage,
then run again; the final artifacts must equal an uninterrupted run's, and no partial artifact
may ever be visible under its final name.

Default (fast) subset: one kill inside training. The full matrix (every stage, three seeds) runs
with `pytest -m faults` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .conftest import config_dict

STAGES = ("curate", "train", "search", "eval")
ARTIFACTS = ["curate/chat", "curate/orca", "adapters/chat", "adapters/orca", "search", "eval"]


def _config(root: Path, model: Path, data: dict) -> Path:
    cfg = config_dict(root / "run", model, data)
    cfg["training"].update(max_steps=6, checkpoint_steps=2)
    cfg["search"].update(grid_values=[0.0, 0.5, 1.0])
    cfg["eval"].update(tasks=["demo_colours"], limit=4)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Run:
    """`fashionfuse run` in a subprocess, its output lines timestamped."""

    def __init__(self, config: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.start = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "fashionfuse", "run", str(config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.start, line.rstrip("\n")))

    def wait(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def kill_at(self, seconds: float) -> bool:
        """SIGKILL at `seconds` after the start; False if the run finished first."""
        while time.monotonic() - self.start < seconds:
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        self.proc.send_signal(signal.SIGKILL)
        self.wait()
        return True

    def kill_when(self, ready, delay: float) -> bool:
        """SIGKILL `delay` seconds after `ready()` first holds; False if the run finished first."""
        while not ready():
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        return self.kill_at(time.monotonic() - self.start + delay)

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _stage_windows(run: Run) -> dict[str, tuple[float, float]]:
    """When each stage ran in an uninterrupted run, from its output lines."""
    first = {stage: None for stage in STAGES}
    last = dict(first)
    prefixes = {"curate": "curate ", "train": "train ", "search": "search", "eval": "eval "}
    for t, line in run.lines:
        for stage, prefix in prefixes.items():
            if line.startswith(prefix):
                first[stage] = t if first[stage] is None else first[stage]
                last[stage] = t
    # a stage runs from the previous stage's last line to its own last line
    out, begin = {}, 0.0
    for stage in STAGES:
        out[stage] = (begin, last[stage])
        begin = last[stage]
    return out


def _no_partial_artifacts(run_dir: Path) -> None:
    """Every artifact under its final name is complete (has its manifest)."""
    for rel in ARTIFACTS:
        d = run_dir / rel
        if d.exists():
            assert (d / "manifest.json").is_file(), f"{rel} visible without a manifest"


def _compare(run_dir: Path, reference: Path) -> None:
    for name in ("chat", "orca"):
        for f in ("train.jsonl", "validation.jsonl", "rejects.jsonl", "stats.json"):
            a = (run_dir / "curate" / name / f).read_bytes()
            assert a == (reference / "curate" / name / f).read_bytes(), f"curate/{name}/{f}"
        got = load_file(run_dir / "adapters" / name / "adapter_model.safetensors")
        want = load_file(reference / "adapters" / name / "adapter_model.safetensors")
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
    trials = json.loads((run_dir / "search" / "trials.json").read_text())
    ref = json.loads((reference / "search" / "trials.json").read_text())
    key = lambda t: tuple(t["weights"].values())  # noqa: E731
    assert len(trials) == len(ref) == 9
    assert len({key(t) for t in trials}) == 9, "a candidate was scored twice"
    for a, b in zip(sorted(trials, key=key), sorted(ref, key=key)):
        assert key(a) == key(b) and a["score"] == pytest.approx(b["score"], rel=1e-4)
    table = json.loads((run_dir / "eval" / "table.json").read_text())
    assert table == json.loads((reference / "eval" / "table.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, demo_data):
    root = tmp_path_factory.mktemp("reference")
    run = Run(_config(root, tiny_model, demo_data))
    assert run.wait() == 0, run.output[-3000:]
    return {"run_dir": root / "run", "windows": _stage_windows(run)}


def _checkpoint_step(run_dir: Path) -> dict[str, int]:
    steps = {}
    for name in ("chat", "orca"):
        state = run_dir / "adapters" / f".{name}.work" / "checkpoint" / "state.pt"
        if state.exists():
            steps[name] = int(torch.load(state, weights_only=True)["step"])
    return steps


def _kill_and_resume(stage: str, seed: int, reference, tmp_path, tiny_model, demo_data) -> None:
    begin, end = reference["windows"][stage]
    at = random.Random(f"{stage}:{seed}").uniform(begin, end)
    config = _config(tmp_path, tiny_model, demo_data)
    run = Run(config)
    killed = run.kill_at(at)
    run_dir = tmp_path / "run"
    _no_partial_artifacts(run_dir)
    checkpoints = _checkpoint_step(run_dir)
    again = Run(config)
    assert again.wait() == 0, again.output[-3000:]
    for name, step in checkpoints.items():  # training resumed, not restarted
        assert f"train {name}: resuming from step {step}/6" in again.output, again.output[-2000:]
    _compare(run_dir, reference["run_dir"])
    assert killed or stage == "eval", f"the run finished before {at:.1f} s ({stage})"


def test_killed_during_training_resumes_from_its_checkpoint(reference, tmp_path, tiny_model,
                                                           demo_data):
    """Killed just after training wrote its first checkpoint: the rerun resumes from it (not
    from step 0) and ends with the uninterrupted run's artifacts."""
    config = _config(tmp_path, tiny_model, demo_data)
    state = tmp_path / "run" / "adapters" / ".chat.work" / "checkpoint" / "state.pt"
    run = Run(config)
    assert run.kill_when(state.exists, delay=0.1)
    _no_partial_artifacts(tmp_path / "run")
    checkpoints = _checkpoint_step(tmp_path / "run")
    assert checkpoints.get("chat", 0) >= 2
    again = Run(config)
    assert again.wait() == 0, again.output[-3000:]
    assert f"train chat: resuming from step {checkpoints['chat']}/6" in again.output
    _compare(tmp_path / "run", reference["run_dir"])


@pytest.mark.faults
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("stage", STAGES)
def test_killed_anywhere_resumes_to_the_same_artifacts(stage, seed, reference, tmp_path,
                                                      tiny_model, demo_data):
    _kill_and_resume(stage, seed, reference, tmp_path, tiny_model, demo_data)
