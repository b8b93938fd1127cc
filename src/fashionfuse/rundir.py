"""Run-directory layout, atomic writes and manifests.

Every stage writes into a temporary sibling directory and renames it into place only when it
has finished, so a killed stage never leaves a half-written artifact that looks complete. Each
artifact directory carries a `manifest.json` with the stage's fingerprint (hash of the config
sections and upstream artifacts it depends on); `is_up_to_date` compares fingerprints.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .allocator import active_allocator

MANIFEST = "manifest.json"
_TRACKED_PACKAGES = (
    "fashionfuse", "torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate",
    "lm_eval", "optuna",
)


class RunLayout:
    """Paths of every artifact under one run directory."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)

    @property
    def resolved_config(self) -> Path:
        return self.root / "config.resolved.yaml"

    def curated(self, dataset: str) -> Path:
        return self.root / "curate" / dataset

    def adapter(self, dataset: str) -> Path:
        return self.root / "adapters" / dataset

    def train_work(self, dataset: str) -> Path:
        return self.root / "adapters" / f".{dataset}.work"

    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def search_work(self) -> Path:
        return self.root / "search.work"

    @property
    def fused(self) -> Path:
        return self.root / "search" / "fused"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def ablation(self, name: str | None = None) -> Path:
        """`ablate/` (the comparison) or one of its variant run dirs."""
        return self.root / "ablate" / name if name else self.root / "ablate"

    def round(self, number: int) -> Path:
        """The run dir of iterative-fusion round `number` (1-based)."""
        return self.root / "rounds" / f"round-{number}"


def link_shared(parent: str | Path, child: str | Path, folders: tuple[str, ...]) -> Path:
    """Create run dir `child` with `folders` of run dir `parent` linked in (relative links), as
    fusion rounds share curated data and ablation variants share data and adapters."""
    child = Path(child)
    child.mkdir(parents=True, exist_ok=True)
    for name in folders:
        link = child / name
        if not link.exists():
            os.symlink(os.path.relpath(Path(parent) / name, child), link)
    return child


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape an artifact."""
    out = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def path_fingerprint(path: str | Path, max_hash_bytes: int = 256 << 20) -> str:
    """Content hash of a file or directory; large trees hash names, sizes and mtimes instead."""
    p = Path(path)
    if not p.exists():
        return f"absent:{path}"
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    total = sum(f.stat().st_size for f in files)
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        if total <= max_hash_bytes:
            h.update(file_digest(f).encode())
        else:
            st = f.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def fingerprint(parts: Any) -> str:
    """Hash of everything a stage's output depends on (any JSON-able value)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def without_unset(settings: dict, added: tuple[str, ...]) -> dict:
    """`settings` (a config section's dump) without the `added` fields that are unset (None or
    empty): fields added to a section after artifacts were built keep those artifacts'
    fingerprints until a field is actually used."""
    return {k: v for k, v in settings.items() if not (k in added and not v)}


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """Write text atomically (temp file then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp directory that replaces `final` only if the block finishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        os.replace(final, old)
    except FileNotFoundError:
        pass
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(
    directory: Path,
    *,
    stage: str,
    fingerprint: str,
    config_hash: str,
    inputs: dict[str, str],
    seed: int,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    content: list[str] | None = None,
) -> dict[str, Any]:
    """Write `manifest.json` describing one artifact. `content` names the files (relative to
    `directory`) whose bytes are the artifact's payload: their hash is stored as `content_hash`,
    which downstream stages fingerprint (so a rebuilt artifact with new bytes invalidates them)."""
    directory = Path(directory)
    manifest = {
        "stage": stage,
        "fingerprint": fingerprint,
        "content_hash": content_digest(directory, content) if content else None,
        "config_hash": config_hash,
        "inputs": inputs,
        "seed": seed,
        "versions": library_versions(),
        "allocator": active_allocator(),  # malloc changes memory and speed, not results
        "created_unix": round(time.time(), 3),
        "metrics": metrics or {},
        **(extra or {}),
    }
    write_json(Path(directory) / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of an artifact directory, or None when absent or unreadable."""
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def content_digest(directory: Path, files: list[str]) -> str:
    """Hash of the named files' bytes (absent files count as absent)."""
    h = hashlib.sha256()
    for name in sorted(files):
        path = Path(directory) / name
        h.update(f"{name}:{file_digest(path) if path.is_file() else 'absent'}\n".encode())
    return h.hexdigest()[:16]


def artifact_id(directory: Path) -> str | None:
    """What downstream stages fingerprint an artifact by: the hash of its payload files (the
    adapter weights, the curated splits) when its manifest has one, else its fingerprint; None
    when the artifact is missing."""
    manifest = read_manifest(directory) or {}
    return manifest.get("content_hash") or manifest.get("fingerprint")


def is_up_to_date(directory: Path, expected_fingerprint: str) -> bool:
    """True when `directory` holds a finished artifact built from the same inputs."""
    manifest = read_manifest(directory)
    return manifest is not None and manifest.get("fingerprint") == expected_fingerprint


@contextlib.contextmanager
def run_lock(run_dir: str | Path, shared: bool = False) -> Iterator[None]:
    """Hold the run dir's lock while a stage runs: a second stage or `run` on the same run dir
    is refused at once, naming the holder's pid and host. `shared` holders (search workers on
    one `search.storage`, the ranks of one torchrun job) coexist with each other but not with an
    exclusive holder. The kernel drops the lock when its process dies, so a killed run never
    leaves a stale lock behind."""
    from .errors import UserError

    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".lock"
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise UserError(f"{root}: in use by {holder}; wait for it to finish or stop it "
                        "(a killed process releases the lock)") from None
    try:
        if not shared:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
