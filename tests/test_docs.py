"""The README and the docs site say what the code does: every config field has a description
(the configuration page is generated from them), the flags of every command they show exist,
the README stays short, and neither carries development history."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from fashionfuse.cli import app
from fashionfuse.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
ALL_TEXT = "\n".join([README, *PAGES.values()])


def _sections(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _sections(a)]


def _config_fields(model: type[BaseModel], prefix: str = "") -> dict[str, bool]:
    """Every config path -> whether it is a section (a model of further fields)."""
    out = {}
    for name, field in model.model_fields.items():
        subs = _sections(field.annotation)
        out[prefix + name] = bool(subs)
        for sub in subs:
            out |= _config_fields(sub, f"{prefix}{name}.")
    return out


def _reference_rows():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "docs" / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.rows(RunConfig), module.reference_markdown()


def test_every_config_field_has_a_description_and_a_row_in_the_reference():
    fields = _config_fields(RunConfig)
    rows, markdown = _reference_rows()
    assert {p.replace("[]", "") for p, *_ in rows} == set(fields)
    undescribed = [p for p, _, _, meaning in rows if not meaning.strip()]
    assert not undescribed, "config fields without a description (Field(description=...) or " \
        "an attribute docstring)"
    assert all(f"| `{p}` |" in markdown for p, *_ in rows)


def test_the_readme_is_short_and_links_the_docs():
    assert len(README.splitlines()) <= 200
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", README))
    assert linked and linked <= set(PAGES), linked - set(PAGES)


def test_no_development_history_in_the_readme_or_docs():
    for name, text in {"README.md": README, **PAGES}.items():
        for pattern in (r"session of 20\d\d", r"\bissues? \d+", r"\baudit\b",
                        r"\b20\d\d-\d\d-\d\d\b", r"the issue asks"):
            hits = re.findall(f".{{0,40}}{pattern}.{{0,20}}", text)
            assert not hits, (name, hits)


def _commands(pattern: str) -> dict[str, set[str]]:
    """Flags of the README's and the docs' commands matching `pattern` (its group 1 names the
    command)."""
    out: dict[str, set[str]] = {}
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", ALL_TEXT, flags=re.M | re.S)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", ALL_TEXT, flags=re.M | re.S)
    spans = [line for block in fenced for line in block.splitlines()]
    for span in spans + re.findall(r"`([^`]+)`", prose):
        for m in re.finditer(pattern, span):
            flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span[m.end():])
            out.setdefault(m.group(1), set()).update(flags)
    return out


@pytest.mark.parametrize("script, flags", sorted(
    _commands(r"python scripts/(\w+)\.py").items()))
def test_script_flags_in_the_docs_exist(script, flags):
    usage = subprocess.run([sys.executable, f"scripts/{script}.py", "--help"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert not sorted(f for f in flags if f not in usage), f"{script}.py lacks them"


def test_cli_flags_in_the_docs_exist():
    commands = _commands(r"fashionfuse ([a-z][a-z-]+)")
    assert commands
    runner = CliRunner()
    for command, flags in commands.items():
        result = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0, f"the docs name `fashionfuse {command}`: {result.output}"
        missing = sorted(f for f in flags if f not in result.output)
        assert not missing, f"fashionfuse {command} lacks {missing}"


def test_build_llama_cpp_help_builds_nothing(tmp_path):
    """`--help` prints the usage and exits: no download, no compile, nothing cached."""
    env = {**os.environ, "FASHIONFUSE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "scripts/build_llama_cpp.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and "usage:" in done.stdout
    assert not (tmp_path / "cache").exists()


def test_configuration_page_is_what_the_models_generate():
    """docs/configuration.md holds the generated tables (readable on GitHub, not only on the
    built site); after a field changes, `python docs/hooks/config_reference.py` rewrites them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "docs" / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert module.END in page
    assert page == module.with_reference(page), \
        "docs/configuration.md is stale: run python docs/hooks/config_reference.py"


def test_each_field_has_a_description_of_its_own():
    """No description copied over several fields of one section."""
    from collections import defaultdict

    rows, _ = _reference_rows()
    seen = defaultdict(list)
    for path, _type, _default, meaning in rows:
        seen[(path.rsplit(".", 1)[0] if "." in path else "", meaning)].append(path)
    shared = [paths for paths in seen.values() if len(paths) > 1]
    assert not shared, shared


FIGURE = re.compile(r"\b(\d[\d,]*(?:\.\d+)?)\s?(?:GB|MiB|GiB|tokens/s|rows/s)\b|\b(\d+\.\d+)x\b")


@pytest.mark.parametrize("page", ["README.md", "docs/index.md", "docs/getting-started.md",
                                  "docs/architecture.md", "docs/your-data.md"])
def test_quoted_figures_are_the_benchmarks_own(page):
    """A memory, throughput or ratio figure quoted on a reader's page is one that
    docs/benchmarks.md (or docs/results.md) holds, where its command and machine are: a figure
    re-measured there and forgotten here fails."""
    source = (ROOT / "docs" / "benchmarks.md").read_text() + \
        (ROOT / "docs" / "results.md").read_text()
    numbers = set(re.findall(r"\d[\d,]*(?:\.\d+)?", source))
    text = (ROOT / page).read_text()
    quoted = [(m.group(0), m.group(1) or m.group(2)) for m in FIGURE.finditer(text)]
    missing = [figure for figure, number in quoted if number not in numbers]
    assert not missing, f"{page} quotes figures docs/benchmarks.md does not hold: {missing}"


def _documented_configs() -> dict[str, dict]:
    """The configs a newcomer copies: the README's, docs/your-data.md's and examples/."""
    out = {}
    for page in ("README.md", "docs/your-data.md"):
        blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / page).read_text(), flags=re.S)
        out[page] = yaml.safe_load(next(b for b in blocks if "datasets:" in b))
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        out[str(path.relative_to(ROOT))] = yaml.safe_load(path.read_text())
    return out


def test_the_documented_configs_score_the_users_own_skills():
    """Each documented config holds out a test split of every dataset and scores it
    (eval.skill_tasks): the table's average is "learned my data" and "kept the rest", not the
    leaderboard alone; and each is a valid config."""
    from fashionfuse.config import RunConfig

    configs = _documented_configs()
    assert len(configs) >= 5
    for name, data in configs.items():
        cfg = RunConfig.model_validate(data)
        assert cfg.eval.skill_tasks, name
        assert all(d.test_fraction > 0 for d in cfg.datasets), name


def test_every_command_help_has_examples_and_a_whole_summary():
    """`fashionfuse --help` lists each command with a summary that is not cut mid-phrase, and
    each command's `--help` ends with examples whose config fields exist."""
    from fashionfuse.config import RunConfig, apply_overrides

    runner = CliRunner()
    listing = runner.invoke(app, ["--help"], terminal_width=200).output
    assert "..." not in listing.split("Commands:")[1]
    for command in ("validate", "curate", "train-adapter", "search-weights", "eval", "ablate",
                    "export", "run", "report"):
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        assert "Examples:" in text, command
        examples = text.split("Examples:")[1]
        for option in re.findall(r"--set '?([\w.]+=[^' ]+)'?", examples):
            data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
            RunConfig.model_validate(apply_overrides(data, [option]))
