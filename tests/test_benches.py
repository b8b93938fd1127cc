"""Every `scripts/bench_*.py` mode the README shows, run at its smallest size, so none can rot.

Marked `bench` (minutes in all: the eval and search benches build the demo run once under
`runs/`), outside the default `pytest` run; `make bench-smoke` and `.ci/run` run them. Each
test fails when the script exits non-zero or stops printing the figure the README quotes. The
SmolLM2 modes (`--model smollm2`) run the same code on the real model and need its GGUF file
and `make real`'s run: they skip, saying so, where those are absent. Speed targets are not
checked here (the benches print ratios; timed assertions would fail on a noisy machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
pytestmark = pytest.mark.bench

# (script and its smallest arguments, a line it must print, needs ../shared)
MODES = [
    # decontaminates against ../shared/benchmarks: skips cleanly without it
    ("bench_curate.py --records 500 --queries 20 --planted 5", "records_per_s", True),
    ("bench_curate.py --rows 2000", "rss_ratio_2k_vs_200", False),
    ("bench_attention.py --row 256 --repeats 1", "speedup_llama", False),
    ("bench_eval.py --limit 2 --batch-size 4", "speedup_vs_separate", False),
    ("bench_eval.py --logits", "loglikelihood_speedup_32k_vocab", False),
    ("bench_eval.py --prefix --compute-dtype float32 --limit 1", "leaderboard_speedup_vs_plain",
     True),
    ("bench_eval.py --leaderboard --repeats 1", "eval_five_models_vs_one", True),
    ("bench_eval.py --batch-noise --limit 2", "max_loglikelihood_difference_hflm_batch16", True),
    ("bench_eval.py --batch-noise --noise-dtype float64 --limit 2",
     "max_loglikelihood_difference_hflm_batch16", True),
    ("bench_eval.py --generate --limit 2", "generate_speedup_vs_lm_eval_default", True),
    ("bench_train.py --same-dtype-too --records 16 --held-out 4 --batch-size 8",
     "tokens_per_s_ratio_same_dtype:", False),
    ("bench_train.py --records 16 --held-out 4 --batch-size 8 --memory-cap 8 --cap-batch 2x64 "
     "--same-malloc-too", "fits_under_cap_fashionfuse_2x64: yes", False),
    ("bench_train.py --size 30m --records 8 --held-out 4 --batch-size 8 "
     "--baseline-dtype float32 --compute-dtype float32", "tokens_per_s_ratio_30m", False),
    ("bench_train.py --mix padding30 --records 16 --held-out 4 --batch-size 8 "
     "--baseline-dtype float32 --compute-dtype float32", "tokens_per_s_ratio_padding30", False),
    ("bench_search.py --overhead-only --repeats 2 --val-samples 2", "overhead_pct", False),
    ("bench_search.py --sizes demo --repeats 1 --val-samples 2", "search_speedup_vs_naive_demo",
     False),
    ("bench_search.py --seeds 1 --grid 0,1 --cmaes-settings popsize=5 --repeats 2 "
     "--val-samples 2", "cmaes_evals_pct_of_grid_max", False),
    # the GPU check, every step on a tiny model on the CPU (exit code 1 if any step failed)
    ("gpu_check.py --dry-run", "gpu_check: all steps passed", False),
]
# the same scripts on the real model: only where `make real` has run
REAL_MODES = [
    "bench_train.py --model smollm2 --records 8 --batch-size 4 --max-len 128 --held-out 4 "
    "--same-malloc-too",
    "bench_eval.py --prefix --model smollm2 --models [base] --compute-dtype float32 --limit 1",
    "bench_eval.py --generate --model smollm2 --limit 1",
    "bench_eval.py --batch-noise --model smollm2 --max-length 512 --limit 1",
]


def _run(args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, *f"scripts/{args}".split()], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)


@pytest.mark.parametrize("args,prints,needs_shared", MODES, ids=[m[0] for m in MODES])
def test_bench_mode_runs(args, prints, needs_shared):
    if needs_shared and not (SHARED / "benchmarks").is_dir():
        pytest.skip("needs ../shared/benchmarks (the real benchmark files)")
    proc = _run(args)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert prints in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("args", REAL_MODES)
def test_bench_mode_runs_on_the_real_model(args):
    if not (ROOT / "runs" / "smollm2" / "search" / "fused").is_dir():
        pytest.skip("needs `make real` (SmolLM2's GGUF file and its run in runs/smollm2)")
    proc = _run(args)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
