"""The `fashionfuse` command runs under tcmalloc where installed, and says which allocator ran."""

import os
import subprocess
import sys

import pytest

from fashionfuse.allocator import AllocatorError, active_allocator, chosen_library, find_library

SHOW = ("from fashionfuse.allocator import relaunch_under_allocator, active_allocator; "
        "relaunch_under_allocator(); print(active_allocator())")


def _python(code_or_args, malloc: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "FASHIONFUSE_MALLOC_RELAUNCHED")}
    env["FASHIONFUSE_MALLOC"] = malloc
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_unknown_choice_is_one_line_error_naming_the_variable():
    with pytest.raises(AllocatorError, match="FASHIONFUSE_MALLOC='bogus'"):
        chosen_library("bogus")
    assert chosen_library("system") is None
    proc = _python(["-m", "fashionfuse", "--version"], "bogus")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: FASHIONFUSE_MALLOC='bogus': use one of auto, tcmalloc, jemalloc, system"]


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD: Linux only")
def test_relaunched_under_tcmalloc_where_installed_and_not_when_asked_not_to():
    if find_library("tcmalloc") is None:
        pytest.skip("libtcmalloc is not installed (Debian: libtcmalloc-minimal4)")
    assert _python(SHOW, "auto").stdout.strip() == "tcmalloc"
    assert _python(SHOW, "tcmalloc").stdout.strip() == "tcmalloc"
    assert _python(SHOW, "system").stdout.strip() == "system"
    # the real entry point relaunches and still runs the command, once
    proc = _python(["-m", "fashionfuse", "--version"], "auto")
    assert proc.returncode == 0 and proc.stdout.startswith("fashionfuse "), proc.stderr


def test_a_required_allocator_that_is_missing_is_an_error(monkeypatch):
    monkeypatch.setattr("fashionfuse.allocator.find_library", lambda name: None)
    with pytest.raises(AllocatorError, match="libjemalloc is not installed"):
        chosen_library("jemalloc")
    assert chosen_library("auto") is None  # auto falls back to the system's malloc


def test_this_process_reports_its_allocator():
    assert active_allocator() in ("system", "tcmalloc", "jemalloc")
