"""Rebuild the embedded demo assets under data/ (deterministic for a given seed).

    python scripts/build_demo.py            # raw sources, eval tasks and the tiny base model
    python scripts/build_demo.py --no-model # data only
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fashionfuse.demo import build_base_model, write_eval_tasks, write_raw_sources

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--no-model", action="store_true")
    args = parser.parse_args()
    for name, path in write_raw_sources(args.out / "demo" / "raw", args.seed).items():
        print(f"raw source {name}: {path}")
    tasks = write_eval_tasks(args.out / "demo" / "tasks", args.seed)
    print(f"eval tasks: {tasks}")
    if not args.no_model:
        path = build_base_model(args.out / "tiny-llama", seed=args.seed, steps=args.steps)
        print(f"tiny base model: {path}")


if __name__ == "__main__":
    main()
