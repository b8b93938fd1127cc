"""Build llama.cpp once, for `fashionfuse export` (the merged GGUF and the runtime check) and the
`-m slow` tests: llama-cpp-python from its source release (it compiles llama.cpp: about 6-12
minutes on 2 cores), cached as a wheel, installed into this Python; and that release's bundled
llama.cpp tree (its `convert_hf_to_gguf.py`) unpacked beside it.

    python scripts/build_llama_cpp.py            # prints the llama.cpp folder (LLAMA_CPP_DIR)

Both go under the fashionfuse cache ($FASHIONFUSE_CACHE, else ~/.cache/fashionfuse): a second
run installs the cached wheel in seconds. Needs a C/C++ compiler and cmake; says so otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"


def cache() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from fashionfuse.gguf_base import cache_root

    return cache_root() / "llama-cpp"


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    root = cache()
    wheels, tree = root / "wheels", root / f"llama.cpp-{VERSION}"
    wheel = next(wheels.glob(f"llama_cpp_python-{VERSION}-*.whl"), None) if wheels.is_dir() else None
    if wheel is None or not tree.is_dir():
        missing = [tool for tool in ("cc", "c++", "cmake") if shutil.which(tool) is None]
        if missing:
            raise SystemExit(f"building llama.cpp needs {', '.join(missing)} (a C/C++ compiler "
                             "and cmake)")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                            ":all:", f"llama-cpp-python=={VERSION}", "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if wheel is None:
                print("building llama-cpp-python (compiles llama.cpp; minutes)", file=sys.stderr)
                subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", str(sdist),
                                "-w", str(wheels)], check=True)
                wheel = next(wheels.glob(f"llama_cpp_python-{VERSION}-*.whl"))
            with tarfile.open(sdist) as tar:
                prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
                members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
                for m in members:
                    m.name = m.name[len(prefix):]
                tar.extractall(Path(tmp) / "tree", members=[m for m in members if m.name],
                               filter="data")
            shutil.rmtree(tree, ignore_errors=True)
            shutil.move(str(Path(tmp) / "tree"), tree)
    # llama-cpp-python, and the one package llama.cpp's converter needs beyond ours
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(wheel), "sentencepiece"],
                   check=True)
    print(tree)


if __name__ == "__main__":
    main()
