"""A calm console: fashionfuse's own lines on the terminal, everything else in the stage's log.

While a command runs, third-party logging (lm-eval's per-task notices, transformers, datasets,
PEFT, accelerate, optuna), Python warnings and the libraries' own progress bars go to
`RUN_DIR/logs/<command>.log` instead of the terminal; `-v` shows them on the terminal too.
fashionfuse's own progress bars (curation, training steps, search trials; totals and ETA) write
to `progress_file()`, the terminal.
`--quiet` keeps only errors and the closing summary on the terminal (the rest goes to the log).
`--log-format json` writes each of fashionfuse's lines as a JSON object
(`{"time", "command", "message"}`) for machines, progress bars to the log.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

_PROGRESS: list = []  # where fashionfuse's own progress bars go while a command runs


def progress_file():
    """The stream for fashionfuse's progress bars: the terminal (the log with --quiet)."""
    return _PROGRESS[-1] if _PROGRESS else sys.stderr


THIRD_PARTY = ("lm_eval", "transformers", "datasets", "peft", "accelerate", "optuna",
               "bitsandbytes", "torch", "urllib3", "filelock", "fsspec", "huggingface_hub")


class _JsonLines(io.TextIOBase):
    """A stdout that writes every finished line as a JSON object."""

    def __init__(self, out, command: str):
        self.out, self.command, self.buffer_ = out, command, ""

    def write(self, text: str) -> int:
        self.buffer_ += text.replace("\r", "\n")
        *lines, self.buffer_ = self.buffer_.split("\n")
        for line in lines:
            if line.strip():
                self.out.write(json.dumps({"time": round(time.time(), 3), "command": self.command,
                                           "message": line}) + "\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def _quiet_libraries(verbose: bool) -> None:
    """The libraries' own progress bars and default handlers off (unless verbose)."""
    if verbose:
        return
    with contextlib.suppress(Exception):
        import transformers

        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.enable_propagation()
        transformers.utils.logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        import datasets

        datasets.disable_progress_bars()


@contextlib.contextmanager
def console(run_dir: str | Path, command: str, verbose: bool = False, quiet: bool = False,
            log_format: str = "text") -> Iterator[Path]:
    """Route logs for one command; yields the log file's path."""
    log_path = Path(run_dir) / "logs" / f"{command}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved_root = (root.level, root.handlers[:])
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
             for name in THIRD_PARTY}
    root.handlers = [handler] + ([logging.StreamHandler(sys.stderr)] if verbose else [])
    root.setLevel(logging.INFO)
    for name in THIRD_PARTY:
        lg = logging.getLogger(name)
        lg.handlers, lg.propagate = [], True
    logging.captureWarnings(True)
    _quiet_libraries(verbose)
    stdout, stderr = sys.stdout, sys.stderr
    log_file = open(log_path, "a", encoding="utf-8")
    _PROGRESS.append(log_file if quiet or log_format == "json" else stderr)
    if not verbose:  # libraries' own bars and prints (lm-eval's tqdm) go to the log
        sys.stderr = log_file
    if quiet:
        sys.stdout = log_file
    elif log_format == "json":
        sys.stdout = _JsonLines(stdout, command)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield log_path
    finally:
        sys.stdout.flush()
        sys.stdout, sys.stderr = stdout, stderr
        _PROGRESS.pop()
        log_file.close()
        logging.captureWarnings(False)
        root.handlers, (root.level, _) = saved_root[1], saved_root
        for name, (handlers, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()
