#!/usr/bin/env bash
# Wheels for a GPU machine without registry access (an air-gapped cluster node), for
# scripts/gpu_check.py: such a machine often has torch, transformers, PEFT and accelerate but
# not bitsandbytes or pydantic, which the check imports. Downloaded here for CPython 3.12 on
# manylinux x86_64 into the git-ignored .whl/ (about 46 MiB: bitsandbytes alone is 43 MB), so
# they travel with the checkout. On the GPU machine:
#
#   pip install --no-index --find-links .whl bitsandbytes pydantic
#   PYTHONPATH=src python scripts/gpu_check.py
#
# Not fetched: lm-eval, for the check's eval step, which is skipped where lm-eval is not
# installed. With what it imports (datasets, pyarrow, pandas, scikit-learn and scipy, ...) it
# is well over 100 MiB, past what one call to such a machine carries beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
# the versions pyproject.toml allows; pydantic's own pins choose pydantic-core
BNB=$(grep -o '"bitsandbytes[^"]*"' pyproject.toml | tr -d '"')
PYDANTIC=$(grep -o '"pydantic[^"]*"' pyproject.toml | tr -d '"')

mkdir -p .whl
"$PY" -m pip download -q "${TARGET[@]}" -d .whl --no-deps "$BNB"
"$PY" -m pip download -q "${TARGET[@]}" -d .whl "$PYDANTIC"
# typing-extensions comes with torch on the GPU machine
rm -f .whl/typing_extensions-*.whl
ls -1 .whl
du -sh .whl
