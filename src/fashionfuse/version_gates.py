"""Version gates for the third-party internals fashionfuse relies on.

Every touch of a library's internals lives in one module per concern (docs, "Third-party
internals"): lm-eval in `lm_eval_model.py`, PEFT in `adapters/peft_layers.py`, bitsandbytes in
`base_model.py`, transformers in `gguf_base.py` and `train/gated_mlp.py`. Each touch asks
`internals_allowed(library)` first. It is true when the installed version lies inside the range the touch was written and
tested for (`TESTED`); outside it the touch takes the library's public path instead (slower,
the same results; a test per touch compares the two) and one line on stderr says so, once per
library. `FASHIONFUSE_PUBLIC_PATHS=peft,lm-eval` (or `all`) forces the public paths, to rule
fashionfuse's shortcuts out when a result looks wrong.
"""

from __future__ import annotations

import functools
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# library (its distribution name) -> versions its internals were written and tested for
TESTED = {
    "lm-eval": ">=0.4.13,<0.4.14",
    "peft": ">=0.21.2,<0.22",
    "bitsandbytes": ">=0.50.2,<0.51",
    "transformers": ">=5.24,<5.25",
}
FORCE_ENV = "FASHIONFUSE_PUBLIC_PATHS"

_told: set[str] = set()


@functools.cache
def installed_version(library: str) -> str | None:
    """The installed version of `library` (a distribution name), None when absent."""
    try:
        return version(library)
    except PackageNotFoundError:
        return None


def forced_public(library: str) -> bool:
    """Whether `FASHIONFUSE_PUBLIC_PATHS` asks for `library`'s public paths."""
    named = {n.strip().lower() for n in os.environ.get(FORCE_ENV, "").split(",") if n.strip()}
    return "all" in named or library in named


def in_tested_range(library: str, installed: str | None = None) -> bool:
    """Whether `installed` (default: the installed version) of `library` is one its internals
    were tested with."""
    installed = installed or installed_version(library)
    return installed is not None and Version(installed) in SpecifierSet(TESTED[library])


def internals_allowed(library: str) -> bool:
    """True when fashionfuse may use `library`'s internals (installed version tested, not
    forced off); otherwise False, after saying once which public path is taken and why."""
    if library not in TESTED:
        raise KeyError(f"no version gate for {library!r}; known: {', '.join(TESTED)}")
    if forced_public(library):
        reason = f"{FORCE_ENV} names it"
    elif in_tested_range(library):
        return True
    else:
        reason = (f"{library} {installed_version(library)} is outside the versions its internals "
                  f"were tested with ({TESTED[library]})")
    if library not in _told:
        _told.add(library)
        print(f"fashionfuse: {reason}: using {library}'s public path (slower, same results)",
              file=sys.stderr, flush=True)
    return False
