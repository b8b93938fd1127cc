"""Benchmark fusion-weight search on the demo: per-candidate overhead, naive route, TPE vs grid.

    python scripts/bench_search.py [--grid 0,0.25,0.5,0.75,1] [--seeds 3]

1. Seconds per candidate of the in-memory search loop (scale switching + objective + optuna
   trial stored in the search's own storage, a journal file) against the pure forward cost of
   the same validation batches with the same active adapters (no switching, no storage):
   `overhead_pct`; the same with the SQLite file used before: `overhead_pct_sqlite`.
2. The naive route per candidate: merge the adapters with PEFT
   (`add_weighted_adapter(..., combination_type="cat")`), save the fused adapter, reload base +
   adapter from disk, evaluate: `speedup_vs_naive` = naive seconds / our seconds.
3. Full grid over `--grid` values for the three demo adapters; then optuna's TPE, GP and CMA-ES
   samplers, per seed, count the evaluations until their best score is at least as good as the
   grid's best: `sampler_evals_pct_of_grid_<sampler>` = median count / grid size * 100 (and
   the maximum over seeds; `cmaes_evals_pct_of_grid_max` for CMA-ES). `--cmaes-settings`
   adds CMA-ES with other `CmaEsSampler` settings (e.g. `lr_adapt=True popsize=10`), each
   printed as `sampler_evals_pct_of_grid_max_cmaes[<settings>]`. The objective is
   deterministic, so scores are memoised: a point the samplers revisit is scored once.

4. `--sizes demo,30m,300m`: instead of 1-3, the resident route against the naive route at
   each model size: random-initialised Llamas (4-bit NF4 on CPU, saved in bfloat16 like real
   checkpoints) with three random rank-8 all-linear adapters, scored on the same
   `--val-samples` validation records per dataset: `search_speedup_vs_naive_<size>`.
   `--compute-dtype` (default bfloat16, the demo's) sets both routes' compute dtype; `auto`
   is float32 on CPUs without native bfloat16, where the forward pass is far cheaper and the
   naive route's loading and saving weigh more.

Builds the demo adapters in runs/bench_search first if absent.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
from bench_models import random_llama

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
RUN = ROOT / "runs" / "bench_search"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grid", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--overhead-only", action="store_true", help="part 1 only")
    parser.add_argument("--sizes", default=None, help="e.g. demo,30m,300m: the size sweep only")
    parser.add_argument("--val-samples", type=int, default=8)
    parser.add_argument("--compute-dtype", default="bfloat16",
                        choices=["auto", "bfloat16", "float16", "float32"],
                        help="model.quantization.compute_dtype of the size sweep (both routes)")
    parser.add_argument("--cmaes-settings", nargs="*", default=[], metavar="KEY=VALUE[,...]",
                        help="also CMA-ES with these CmaEsSampler settings, one set per word")
    args = parser.parse_args()
    cmaes_settings = {spec: _keywords(spec) for spec in args.cmaes_settings}
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for stage in ("curate", "train-adapter"):
        subprocess.run([sys.executable, "-m", "fashionfuse.cli", stage, str(CONFIG), "--set",
                        f"run_dir={RUN}"], cwd=ROOT, env=env, check=True, capture_output=True)

    if args.sizes:
        size_sweep(args.sizes.split(","), args.val_samples, args.compute_dtype)
        return

    from peft import PeftModel

    from fashionfuse.base_model import load_base_model, load_tokenizer
    from fashionfuse.config import load_config
    from fashionfuse.adapters.runtime import attach_adapters, set_fusion_weights
    from fashionfuse.search.objectives import ValidationLoss

    torch.manual_seed(0)
    cfg = load_config(CONFIG, [f"run_dir={RUN}"])
    names = cfg.search_adapters
    dirs = {n: RUN / "adapters" / n for n in names}
    tok = load_tokenizer(cfg.model)
    model = attach_adapters(load_base_model(cfg.model, device="cpu"), dirs)
    objective = ValidationLoss.from_config(cfg, tok, "cpu")
    rng = torch.Generator().manual_seed(0)
    cands = [{n: float(x) for n, x in zip(names, torch.rand(len(names), generator=rng))}
             for _ in range(args.repeats)]

    # 1. per-candidate cost of the search loop vs pure forward, interleaved (forward, loop,
    # forward, loop, ...) so the machine's drift falls on both sides; medians
    from fashionfuse.search.study import study_storage

    set_fusion_weights(model, cands[0])
    objective.per_dataset(model)  # warm-up

    def loop_seconds(make_storage) -> tuple[float, float]:
        """Median seconds of a pure forward and of one candidate of the loop (enqueue, ask,
        set weights, score, store the per-dataset scores, tell) on a fresh study."""
        forward, loop = [], []
        with tempfile.TemporaryDirectory() as tmp:
            study = optuna.create_study(storage=make_storage(tmp), direction="minimize")
            dists = {n: optuna.distributions.FloatDistribution(0.0, 1.0) for n in names}
            for c in cands:
                t0 = time.perf_counter()
                objective.per_dataset(model)
                forward.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                study.enqueue_trial(c)
                trial = study.ask(dists)
                set_fusion_weights(model, {n: trial.params[n] for n in names})
                per = objective.per_dataset(model)
                trial.set_user_attr("per_dataset", per)
                study.tell(trial, objective.combine(per))
                loop.append(time.perf_counter() - t0)
        return statistics.median(forward), statistics.median(loop)

    # the search's own storage (a journal file in a run dir without search.storage), then the
    # SQLite file it used before
    forward_s, ours_s = loop_seconds(
        lambda tmp: study_storage(load_config(CONFIG, [f"run_dir={tmp}"])))
    forward_sqlite_s, sqlite_s = loop_seconds(lambda tmp: f"sqlite:///{tmp}/s.db")
    overhead = 100 * (ours_s - forward_s) / forward_s
    overhead_sqlite = 100 * (sqlite_s - forward_sqlite_s) / forward_sqlite_s
    if args.overhead_only:
        print(f"pure_forward_s_per_candidate: {forward_s:.4f}")
        print(f"search_loop_s_per_candidate: {ours_s:.4f}")
        print(f"overhead_pct: {overhead:.2f}")
        print(f"overhead_pct_sqlite: {overhead_sqlite:.2f}")
        return

    # 2. naive route: PEFT cat-merge, save, reload from disk, evaluate
    naive_times = []
    for c in cands[:3]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            m = attach_adapters(load_base_model(cfg.model, device="cpu"), dirs)
            m.add_weighted_adapter(names, [c[n] for n in names], "fused", combination_type="cat")
            m.save_pretrained(tmp, selected_adapters=["fused"])
            del m
            reloaded = PeftModel.from_pretrained(load_base_model(cfg.model, device="cpu"),
                                                 f"{tmp}/fused", adapter_name="fused").eval()
            objective.per_dataset(reloaded)
            naive_times.append(time.perf_counter() - t0)
    naive_s = statistics.median(naive_times)

    # 3. the samplers vs the grid
    values = [float(x) for x in args.grid.split(",")]
    import itertools

    scores: dict[tuple, float] = {}

    def score(weights) -> float:
        """The objective at `weights`, memoised (it is deterministic)."""
        key = tuple(round(float(w), 6) for w in weights)
        if key not in scores:
            set_fusion_weights(model, dict(zip(names, key)))
            scores[key] = objective.combine(objective.per_dataset(model))
        return scores[key]

    grid_scores = [score(combo) for combo in itertools.product(values, repeat=len(names))]
    best_grid = min(grid_scores)
    from fashionfuse.config import SearchConfig
    from fashionfuse.search.methods import cmaes, gp, tpe

    search_cfg = SearchConfig(low=min(values), high=max(values), step=0.05, gp_startup_trials=5)
    samplers = {"tpe": lambda seed: tpe.sampler(search_cfg, seed),
                "gp": lambda seed: gp.sampler(search_cfg, seed),
                "cmaes": lambda seed: cmaes.sampler(search_cfg, seed)}
    for spec, keywords in cmaes_settings.items():
        samplers[f"cmaes[{spec}]"] = (lambda kw: lambda seed: optuna.samplers.CmaEsSampler(
            seed=seed, warn_independent_sampling=False, **kw))(keywords)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    counts_by = {}
    for label, make_sampler in samplers.items():
        counts = counts_by[label] = []
        for seed in range(args.seeds):
            study = optuna.create_study(direction="minimize", sampler=make_sampler(seed))
            if label != "tpe":  # what methods/gp.py and cmaes.py enqueue first
                study.enqueue_trial(gp.start_point(search_cfg, names))
            needed = None
            for k in range(1, len(grid_scores) + 1):
                trial = study.ask(tpe.distributions(search_cfg, names))
                study.tell(trial, score([trial.params[n] for n in names]))
                if study.best_value <= best_grid:
                    needed = k
                    break
            counts.append(needed or len(grid_scores))
            print(f"{label} seed {seed}: matched the grid's best after {needed} evaluations")

    print(f"validation: {sum(len(b) for b in objective.batches.values())} batches over {len(names)} datasets")
    print(f"pure_forward_s_per_candidate: {forward_s:.4f}")
    print(f"search_loop_s_per_candidate: {ours_s:.4f}")
    print(f"naive_s_per_candidate: {naive_s:.3f}")
    print(f"grid_size: {len(grid_scores)}, grid_best: {best_grid:.4f}, "
          f"tpe_evals: {counts_by['tpe']}, gp_evals: {counts_by['gp']}, "
          f"cmaes_evals: {counts_by['cmaes']}")
    print(f"overhead_pct: {overhead:.2f}")
    print(f"overhead_pct_sqlite: {overhead_sqlite:.2f}")
    print(f"speedup_vs_naive: {naive_s / ours_s:.1f}")
    for label, counts in counts_by.items():
        print(f"sampler_evals_pct_of_grid_{label}: "
              f"{100 * statistics.median(counts) / len(grid_scores):.1f}")
        print(f"sampler_evals_pct_of_grid_max_{label}: {100 * max(counts) / len(grid_scores):.1f}")
    print(f"sampler_evals_pct_of_grid_max: {100 * max(counts_by['gp']) / len(grid_scores):.1f}")
    print(f"cmaes_evals_pct_of_grid_max: {100 * max(counts_by['cmaes']) / len(grid_scores):.1f}")


def _keywords(spec: str) -> dict:
    """`lr_adapt=True,popsize=10` as CmaEsSampler keyword arguments."""
    import ast

    pairs = [part.split("=", 1) for part in spec.split(",") if part]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--cmaes-settings {spec!r}: expected KEY=VALUE[,KEY=VALUE]")
    return {key.strip(): ast.literal_eval(value.strip()) for key, value in pairs}


def _random_adapters(base: Path, out: Path, n: int = 3) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = {}
    for i in range(n):
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                         task_type="CAUSAL_LM")
        get_peft_model(model, cfg).save_pretrained(out / f"a{i}")
        dirs[f"a{i}"] = out / f"a{i}"
    return dirs


def size_sweep(sizes: list[str], val_samples: int, compute_dtype: str) -> None:
    """Seconds per candidate, resident vs naive, at each model size (same validation data)."""
    from peft import PeftModel

    from fashionfuse.base_model import (
        load_base_model,
        load_tokenizer,
        resolve_compute_dtype,
    )
    from fashionfuse.config import load_config
    from fashionfuse.adapters.runtime import attach_adapters, set_fusion_weights
    from fashionfuse.search.objectives import ValidationLoss

    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            demo = load_config(CONFIG, [f"run_dir={RUN}"])
            if size == "demo":
                base, params = Path(demo.model.base), None
                dirs = {n: RUN / "adapters" / n for n in demo.search_adapters}
            else:
                tok_dir = ROOT / demo.model.base
                params = random_llama(tmp / "base", size, tok_dir, len(load_tokenizer(demo.model)))
                base, dirs = tmp / "base", _random_adapters(tmp / "base", tmp / "adapters")
            cfg = load_config(CONFIG, [f"run_dir={RUN}", f"model.base={base}",
                                       f"search.objective.max_samples_per_dataset={val_samples}",
                                       f"model.quantization.compute_dtype={compute_dtype}"])
            names = list(dirs)
            tok = load_tokenizer(cfg.model)
            objective = ValidationLoss.from_config(cfg, tok, "cpu")
            t0 = time.perf_counter()
            model = attach_adapters(load_base_model(cfg.model, device="cpu"), dirs)
            load_s = time.perf_counter() - t0
            gen = torch.Generator().manual_seed(0)
            cands = [{n: float(x) for n, x in zip(names, torch.rand(len(names), generator=gen))}
                     for _ in range(4)]
            set_fusion_weights(model, cands[0])
            objective.per_dataset(model)  # warm-up
            ours = []
            for c in cands[1:]:
                t0 = time.perf_counter()
                set_fusion_weights(model, c)
                objective.per_dataset(model)
                ours.append(time.perf_counter() - t0)
            del model
            naive = []
            for c in cands[1:3]:
                t0 = time.perf_counter()
                m = attach_adapters(load_base_model(cfg.model, device="cpu"), dirs)
                m.add_weighted_adapter(names, [c[n] for n in names], "fused",
                                       combination_type="cat")
                m.save_pretrained(tmp / "naive", selected_adapters=["fused"])
                del m
                reloaded = PeftModel.from_pretrained(load_base_model(cfg.model, device="cpu"),
                                                     tmp / "naive" / "fused",
                                                     adapter_name="fused").eval()
                objective.per_dataset(reloaded)
                del reloaded
                naive.append(time.perf_counter() - t0)
            ours_s, naive_s = statistics.median(ours), statistics.median(naive)
            tokens = sum(int(b["attention_mask"].sum()) for bs in objective.batches.values()
                         for b in bs)
            print(f"size {size}: compute dtype {resolve_compute_dtype(cfg.model.quantization, 'cpu')}, "
                  f"{params or 'demo'} parameters, {tokens} validation tokens, "
                  f"resident load {load_s:.1f} s once")
            print(f"search_s_per_candidate_{size}: {ours_s:.3f}")
            print(f"naive_s_per_candidate_{size}: {naive_s:.3f}")
            print(f"search_speedup_vs_naive_{size}: {naive_s / ours_s:.1f}", flush=True)


if __name__ == "__main__":
    main()
