"""The `fashionfuse` command line: thin commands that validate the config and call one stage."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import typer
import yaml

from .config import (
    ABLATION_VARIANTS,
    ConfigError,
    RunConfig,
    base_kind,
    filesystem_problems,
    load_config,
)
from .experiments.pipeline import run_stage

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Multiple LoRA-adapter fusion fine-tuning (FashionGPT).")
_CONSOLE = {"verbose": False, "quiet": False, "log_format": "text"}


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        typer.echo(f"fashionfuse {version('fashionfuse')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar="",
                                 help="Print the version and exit"),
    verbose: bool = typer.Option(False, "--verbose", "-v", metavar="",
                                 help="Show third-party logs and progress bars too"),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar="",
                               help="Only errors and the summary; the rest goes to the log"),
    log_format: str = typer.Option("text", "--log-format", metavar="text|json",
                                   help="text or json (one object a line)"),
) -> None:
    """Console options, before the command: `fashionfuse -q run CONFIG`."""
    if log_format not in ("text", "json"):
        _fail([f"--log-format: {log_format!r}: use text or json"])
    _CONSOLE.update(verbose=verbose, quiet=quiet, log_format=log_format)

ConfigArg = typer.Argument(..., metavar="CONFIG", help="Run config YAML", show_default=False)
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE",
                      help="Override a field: dotted.key=value (repeatable; list items by index "
                      "or name: datasets.chat.max_records=100)")
ForceOpt = typer.Option(False, "--force", metavar="",
                        help="Rebuild even if the artifacts are up to date")

def _fail(lines: list[str]) -> None:
    for line in lines:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code=2)


def _load(config: Path, overrides: Optional[list[str]], reads_sources: bool = True,
          tasks: Optional[str] = None, validating: bool = False) -> RunConfig:
    """The validated config, with everything it points to checked to exist (nothing written).
    `reads_sources`: the local sources must exist and their first rows read in their format.
    `tasks`: also resolve its lm-eval task names ("names"), and require an eval task ("eval").
    Hub ids: offline they must be in the local cache; `validate` online asks the hub."""
    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as exc:
        _fail(exc.problems)
    problems = filesystem_problems(cfg, reads_sources)
    if reads_sources:
        from .curate.sources import first_rows_problems

        for i, d in enumerate(cfg.datasets):
            if d.source.path and Path(d.source.path).is_file():
                problems += first_rows_problems(f"datasets.{i}.source", d.source.format,
                                                d.source.path, d.source.fields,
                                                strict=cfg.curate.strict)
    from .hub_ids import hub_id_problems

    hub, notes = hub_id_problems(cfg, ask_hub=validating)
    problems += hub
    for note in notes:
        typer.echo(f"note: {config}: {note}", err=True)
    if tasks is not None:
        from .evaluate.lm_eval_run import task_name_problems

        problems += task_name_problems(cfg, needs_eval=tasks == "eval")
    if problems:
        _fail([f"{config}: {p}" for p in problems])
    return cfg


def _save_resolved(cfg: RunConfig) -> None:
    from .rundir import RunLayout, write_text

    layout = RunLayout(cfg.run_dir)
    write_text(layout.resolved_config, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _run_stage(command: str, config: Path, overrides: Optional[list[str]],
               stage: Callable[[RunConfig], object], reads_sources: bool = True,
               shared_lock: Callable[[RunConfig], bool] = None, tasks: Optional[str] = None):
    """Validate, lock the run dir, save the resolved config, run. A `UserError` (or a full disk,
    a permission problem) is one line and exit 2; any other exception is a bug and propagates
    with its traceback (exit 1)."""
    from .console import console
    from .errors import UserError, environment_problem
    from .rundir import run_lock

    cfg = _load(config, overrides, reads_sources, tasks)
    shared = int(os.environ.get("WORLD_SIZE", "1")) > 1 or bool(shared_lock and shared_lock(cfg))
    started = time.perf_counter()
    try:
        with run_lock(cfg.run_dir, shared=shared):
            _save_resolved(cfg)
            with console(cfg.run_dir, command, **_CONSOLE) as log:
                result = stage(cfg)
            summary = (f"{command}: done in {time.perf_counter() - started:.0f} s; "
                       f"third-party logs in {log}")
            typer.echo(json.dumps({"time": round(time.time(), 3), "command": command,
                                   "message": summary})
                       if _CONSOLE["log_format"] == "json" else summary)
        _leave_world()
        return result
    except KeyboardInterrupt:
        typer.echo("interrupted: finished work is kept; run the same command to resume", err=True)
        raise typer.Exit(code=130)
    except UserError as exc:
        _fail([str(exc).splitlines()[0] if str(exc) else type(exc).__name__])
    except OSError as exc:
        line = environment_problem(exc)
        if line is None:
            raise
        _fail([line])


def _leave_world() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .train.distributed import leave_world

        leave_world()


def _example(*lines: str) -> str:
    """A command's help epilog: examples, kept as written (click's \\b: no rewrapping)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


@app.command(short_help="Check a config and everything it points to, every problem at once.",
             epilog=_example("fashionfuse validate configs/demo.yaml",
                             "HF_HUB_OFFLINE=1 fashionfuse validate my.yaml   # hub ids in the cache"))
def validate(config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt) -> None:
    """Check a config and print every problem at once (lm-eval task names included)."""
    cfg = _load(config, set_, tasks="eval", validating=True)
    typer.echo(f"{config}: ok ({len(cfg.datasets)} datasets, model.base taken as a "
               f"{base_kind(cfg.model)}, run_dir {cfg.run_dir})")


RoundOpt = typer.Option(
    None, "--round", metavar="N",
    help="With `rounds` in the config (iterative fusion, the paper's Table 6): this round only. "
    "Round N trains its adapters on the base with rounds 1..N-1's fused adapters merged in, "
    "then searches their weights; `run` does every round in order")


@app.command(short_help="Raw sources -> filtered, deduplicated splits; Table 1.",
             epilog=_example("fashionfuse curate configs/demo.yaml",
                             "fashionfuse curate my.yaml --set datasets.chat.max_records=1000"))
def curate(config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt) -> None:
    """Raw sources -> filtered, split datasets with Table 1 statistics."""
    _run_stage("curate", config, set_, lambda cfg: run_stage(cfg, "curate", force=force))


@app.command("train-adapter", short_help="One QLoRA adapter per dataset (resumable).",
             epilog=_example("fashionfuse train-adapter configs/demo.yaml --adapter chat",
                             "torchrun --nproc_per_node 4 -m fashionfuse train-adapter my.yaml"))
def train_adapter(
    config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt,
    adapter: Optional[list[str]] = typer.Option(
        None, "--adapter", "--dataset", metavar="NAME", help="Only these adapters (default: all)"),
    round_: Optional[int] = RoundOpt,
) -> None:
    """Train one QLoRA adapter per curated dataset, plus the configured baselines.

    Multi-process: `torchrun --nproc_per_node N -m fashionfuse train-adapter CONFIG`."""
    _run_stage("train-adapter", config, set_,
               lambda cfg: run_stage(cfg, "train", round_, force=force, adapters=adapter),
               reads_sources=False)


@app.command("search-weights", short_help="Search the fusion weights; write the fused adapter.",
             epilog=_example("fashionfuse search-weights configs/demo.yaml",
                             "fashionfuse search-weights my.yaml --set search.method=gp"))
def search_weights(config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt,
                   force: bool = ForceOpt, round_: Optional[int] = RoundOpt) -> None:
    """Search fusion weights on the held-out objective; export the fused adapter."""
    _run_stage("search-weights", config, set_,
               lambda cfg: run_stage(cfg, "search", round_, force=force),
               reads_sources=False, shared_lock=lambda cfg: cfg.search.storage is not None,
               tasks="names")


@app.command("eval", short_help="lm-eval scores of base, adapters and fused model.",
             epilog=_example("fashionfuse eval configs/demo.yaml",
                             "fashionfuse eval my.yaml --limit 50   # 50 examples per task"))
def eval_(
    config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt,
    limit: Optional[float] = typer.Option(
        None, "--limit", metavar="N",
        help="Examples per task: a whole number, or a fraction below 1 of each task's examples"),
) -> None:
    """Score base, adapters and fused model with lm-evaluation-harness, side by side (with
    `rounds`: the last round's)."""
    overrides = list(set_ or []) + ([f"eval.limit={limit}"] if limit is not None else [])
    _run_stage("eval", config, overrides, lambda cfg: run_stage(cfg, "eval", force=force),
               reads_sources=False, tasks="eval")


@app.command(short_help="The paper's comparison on your data, with its verdict.",
             epilog=_example("fashionfuse ablate configs/demo.yaml",
                             "fashionfuse ablate configs/demo.yaml --set 'ablate.seeds=[1234,1,2]'"),
             help=(
    "The paper's comparison (Tables 7-8): per-dataset adapters, one adapter on all datasets, "
    "data mixes, sequential fine-tuning, fusions with fixed, searched and learned weights and "
    "the dense merge operators, scored with the same eval; writes "
    "ablate/table.{md,csv,json,png}.\n\nVariants (ablate.variants; default: all but "
    "mixed_searched): " + ", ".join(ABLATION_VARIANTS) + "."))
def ablate(config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt,
           force: bool = ForceOpt) -> None:
    """`fashionfuse ablate` (help text above)."""
    from .experiments.ablate import ablate as run_ablation

    _run_stage("ablate", config, set_,
               lambda cfg: _with_report(cfg, run_ablation(cfg, force=force)), tasks="eval")


@app.command(short_help="The fused adapter for llama.cpp, Ollama or vLLM.",
             epilog=_example("fashionfuse export configs/demo.yaml",
                             "fashionfuse export my.yaml --set 'export.formats=[vllm]' "
                             "--set export.max_rank=64"))
def export(config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt) -> None:
    """The fused adapter (export.adapter) as a GGUF LoRA for llama.cpp/Ollama, a vLLM-ready
    adapter, or a merged GGUF file (export.formats); export.check runs it in llama.cpp."""
    from .deploy.pipeline import run_export

    _run_stage("export", config, set_, run_export, reads_sources=False)


@app.command(short_help="All four stages in order (skipping what is done); the report.",
             epilog=_example("fashionfuse run configs/demo.yaml",
                             "fashionfuse run my.yaml --force   # redo every stage"))
def run(config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt, force: bool = ForceOpt) -> None:
    """All stages in order, skipping those whose artifacts are up to date; then the report."""
    from .experiments.pipeline import run_all

    _run_stage("run", config, set_, lambda cfg: _with_report(cfg, run_all(cfg, force=force)),
               tasks="eval")


@app.command(short_help="report.html and report.md of a run dir.",
             epilog=_example("fashionfuse report runs/demo"))
def report(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run dir",
                                          show_default=False)) -> None:
    """Write RUN_DIR/report.html (self-contained) and report.md from the run's artifacts; print
    the ablation's verdict when the run has one."""
    from .experiments.report import verdict_lines, write_report

    from .rundir import RunLayout

    layout = RunLayout(run_dir)
    if not run_dir.is_dir() or not (layout.resolved_config.is_file() or any(
            (run_dir / stage).is_dir() for stage in ("curate", "adapters", "search", "eval"))):
        _fail([f"{run_dir}: not a fashionfuse run dir (no {layout.resolved_config.name} and no "
               "stage folders): give the run_dir of a config a stage has run on"])
    written = write_report(run_dir)
    for line in verdict_lines(run_dir):
        typer.echo(f"verdict: {line}")
    typer.echo(f"report: {written}")


def _with_report(cfg: RunConfig, result):
    """Write the run's report after `run`/`ablate` and say where it is (rank 0 of a launched
    job only: one writer)."""
    from .experiments.report import write_report
    from .train.distributed import is_main_process

    if is_main_process():
        typer.echo(f"report: {write_report(cfg.run_dir)}")
    return result


CONSOLE_FLAGS = ("-v", "--verbose", "-q", "--quiet")


def console_options_first(argv: list[str]) -> list[str]:
    """`fashionfuse validate x.yaml -v` as `fashionfuse -v validate x.yaml`: the console options
    (-v, -q, --log-format F) may follow the command; they are moved before it."""
    front, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg in CONSOLE_FLAGS:
            front.append(arg)
        elif arg == "--log-format" and i + 1 < len(argv):
            front += argv[i:i + 2]
            i += 1
        elif arg.startswith("--log-format="):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


def main() -> None:
    """The `fashionfuse` console entry point: relaunched once under tcmalloc where installed
    (see allocator.py), then the command."""
    from .allocator import AllocatorError, relaunch_under_allocator

    try:
        relaunch_under_allocator()
    except AllocatorError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` each time it wraps a model:
    # a warning about PEFT's code, not the user's, printed before every stage's output
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning)
    app(args=console_options_first(sys.argv[1:]), prog_name="fashionfuse")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
