"""The README says what the code does: its config table names every config field and nothing
else, and the flags of the commands it shows exist."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from fashionfuse.cli import app
from fashionfuse.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def _documented_fields() -> set[str]:
    """The config paths the README's config table names (`datasets[].filters.dedup`; a row
    `a.b` / `c` names `a.b` and `a.c`)."""
    out = set()
    for line in _section("Config reference").splitlines():
        cell = re.match(r"\| (`[^|]+`(?: / `[^|]+`)*) \|", line)
        if not cell:
            continue
        names = re.findall(r"`([^`]+)`", cell.group(1))
        first = names[0].replace("[]", "")
        parent = first.rpartition(".")[0]
        out |= {first} | {f"{parent}.{n}" if parent else n for n in names[1:]}
    return out


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


def test_config_table_names_every_field_and_only_fields():
    documented, fields = _documented_fields(), _config_fields(RunConfig)
    assert not sorted(documented - set(fields)), "README rows naming no config field"
    undocumented = [f for f, section in fields.items() if not section and not any(
        f == d or f.startswith(d + ".") for d in documented)]
    assert not undocumented, "config fields without a README row"


def _commands(pattern: str) -> dict[str, set[str]]:
    """Flags of the README's commands matching `pattern` (its group 1 names the command)."""
    out: dict[str, set[str]] = {}
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", README, flags=re.M | re.S)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", README, flags=re.M | re.S)
    spans = [line for block in fenced for line in block.splitlines()]
    for span in spans + re.findall(r"`([^`]+)`", prose):
        for m in re.finditer(pattern, span):
            flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span[m.end():])
            out.setdefault(m.group(1), set()).update(flags)
    return out


@pytest.mark.parametrize("script, flags", sorted(
    _commands(r"python scripts/(\w+)\.py").items()))
def test_script_flags_in_the_readme_exist(script, flags):
    usage = subprocess.run([sys.executable, f"scripts/{script}.py", "--help"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert not sorted(f for f in flags if f not in usage), f"{script}.py lacks them"


def test_cli_flags_in_the_readme_exist():
    commands = _commands(r"fashionfuse ([a-z][a-z-]+)")
    assert commands
    runner = CliRunner()
    for command, flags in commands.items():
        result = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0, f"README names `fashionfuse {command}`: {result.output}"
        missing = sorted(f for f in flags if f not in result.output)
        assert not missing, f"fashionfuse {command} lacks {missing}"
