"""Which C allocator the process's tensors come from, and starting `fashionfuse` under
tcmalloc where it is installed.

PyTorch's CPU tensors are plain `malloc` blocks. glibc's malloc keeps freed heap memory and
fragments under training's pattern (micro-batches of varying length allocate and free
gigabytes of differently sized activations): on SmolLM2 its resident set climbed from 4.1 to
5.0 GB over six micro-batches while live memory between them was 0.7 GB, and no glibc setting
measured kept the memory without costing the speed (docs/benchmarks.md). tcmalloc (gperftools,
Debian's `libtcmalloc-minimal4`) reuses freed blocks by size class: the same six micro-batches
peaked at 3.2 GB and ran faster. Intel's and PyTorch's own CPU launchers
(`torch.backends.xeon.run_cpu --enable-tcmalloc`) preload it for the same reason.

An allocator must be loaded before the interpreter's first `malloc`, so the `fashionfuse`
command re-executes itself once with `LD_PRELOAD` set (`relaunch_under_allocator`).
`FASHIONFUSE_MALLOC` chooses: `auto` (default: tcmalloc where found, else the system's),
`tcmalloc` or `jemalloc` (required: an error if not found), `system` (no preload). The
allocator changes no result, only memory and speed; every manifest records which ran.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

from .errors import UserError

ENV = "FASHIONFUSE_MALLOC"
CHOICES = ("auto", "tcmalloc", "jemalloc", "system")
_LIBRARIES = {  # name -> (file names to look for, in order)
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
_DEBIAN_PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}
_SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib")
_MARK = "FASHIONFUSE_MALLOC_RELAUNCHED"  # set in the relaunched process: never loop


class AllocatorError(UserError, ValueError):
    """FASHIONFUSE_MALLOC names an unknown allocator or one that is not installed."""


def find_library(name: str) -> Path | None:
    """The shared library of allocator `name` (tcmalloc or jemalloc): in this interpreter's
    prefix (a conda or venv lib/), the system's library directories, then the linker's cache."""
    dirs = [Path(sys.prefix) / "lib", *map(Path, _SEARCH_DIRS)]
    for file in _LIBRARIES[name]:
        for d in dirs:
            if (d / file).is_file():
                return d / file
    found = ctypes.util.find_library(_LIBRARIES[name][0][3:].split(".so")[0])
    return Path(found) if found and Path(found).is_absolute() else None


def active_allocator() -> str:
    """The allocator this process runs on: tcmalloc or jemalloc when mapped into it (preloaded
    or linked), else "system" (glibc's or the platform's malloc)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"


def chosen_library(choice: str | None = None) -> Path | None:
    """The library FASHIONFUSE_MALLOC (or `choice`) asks to preload; None for the system's
    allocator (`system`, or `auto` with no tcmalloc installed). Raises AllocatorError for an
    unknown choice or a required allocator that is not installed."""
    choice = (choice if choice is not None else os.environ.get(ENV, "auto")).strip().lower()
    if choice not in CHOICES:
        raise AllocatorError(f"{ENV}={choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "system" or sys.platform != "linux":
        return None
    library = find_library("tcmalloc" if choice == "auto" else choice)
    if library is None and choice != "auto":
        raise AllocatorError(f"{ENV}={choice}: lib{choice} is not installed (Debian/Ubuntu: "
                             f"apt install {_DEBIAN_PACKAGES[choice]})")
    return library


def preload_environment(library: Path, env: dict | None = None) -> dict:
    """A copy of `env` (default: this process's) that preloads `library` in a new process;
    tcmalloc's report of every allocation over 1 GB (a model's weights) is turned off."""
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = ":".join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2 ** 62))
    env[_MARK] = "1"
    return env


def relaunch_under_allocator() -> None:
    """Re-execute this command with the chosen allocator preloaded, unless it already runs
    on it (or the choice is the system's); returns only when no relaunch is needed."""
    if os.environ.get(_MARK) or not hasattr(os, "execve"):
        return
    library = chosen_library()
    if library is None or active_allocator() != "system":
        return
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], preload_environment(library))
