"""Benchmark: base + 3 adapters scored in one `fashionfuse eval` command vs four `lm_eval` runs.

Both sides score the same models (unquantised bf16 base, as lm-eval's CLI loads it) on the same
demo tasks with the same limit and batch size; each side is timed as whole commands, process
start-up included. The script first builds the demo adapters in runs/bench_eval if absent.

    python scripts/bench_eval.py [--limit N]
    python scripts/bench_eval.py --leaderboard [--benchmarks ../shared/benchmarks]
    python scripts/bench_eval.py --prefix [--limit 20] [--compute-dtype float32]
    python scripts/bench_eval.py --prefix --model smollm2 [--limit 4] [--models "[base, fused]"]
    python scripts/bench_eval.py --batch-noise [--model smollm2] [--noise-dtype float64]
    python scripts/bench_eval.py --generate --model smollm2 [--limit 16] [--batch-size 16]

Ends with `speedup_vs_separate: X` (separate seconds / one-command seconds).

`--leaderboard`: the `leaderboard_v1` preset (ARC 25-shot, HellaSwag 10-shot, MMLU 5-shot over
57 subjects, TruthfulQA 0-shot; local benchmark files) with `--limit 5`, on one model (the base)
and on five (base, three adapters, fused), each one `fashionfuse eval` process:
`eval_five_models_vs_one` = five-model seconds / one-model seconds, with the time breakdown
from `eval/timings.json`.

`--prefix`: the `leaderboard_v1` preset with `--limit 20` (default) on five models (base, three
adapters, fused) with `eval.max_length` 8192 (the demo's small BPE tokenizer makes the
prompts 1,000-3,000 tokens, up to ~6,900 for MMLU's 5-shot history subjects; a row lm-eval cuts
from the left cannot share a prefix; beyond its 512 trained positions the demo's scores mean
nothing, but both routes compute the same function on the same rows, which is what is
measured), one `fashionfuse eval` each with `eval.shared_contexts` false (lm-eval's own
path: every answer choice a row with its context) and true (one pass per shared context):
`prefix_tokens_ratio` (token positions through the model, plain / shared),
`leaderboard_speedup_vs_plain` (scoring seconds, plain / shared), the largest log-likelihood
difference and how many items' metrics differ; then one candidate of the search's `lm_eval`
objective on ARC-Challenge 25-shot and HellaSwag 10-shot (the resident 4-bit model with the
fused weights set, the objective's `TaskSet` and `wrap_model`): `task_objective_speedup`.
`--model smollm2` runs the same comparison on the real model's run (`make real` first: its
curated data, adapters and search are linked into runs/bench_eval_smollm2, nothing retrained),
on `--models` (default base and fused), without the objective part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
RUN = ROOT / "runs" / "bench_eval"
TASKS = ["demo_colours", "demo_opposites", "demo_sounds"]


def _timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--leaderboard", action="store_true")
    parser.add_argument("--logits", action="store_true")
    parser.add_argument("--prefix", action="store_true")
    parser.add_argument("--batch-noise", action="store_true",
                        help="how far lm-eval's own float32 log-likelihoods move between batch "
                        "sizes 1 and 16, beside the shared route (ARC + HellaSwag, --limit)")
    parser.add_argument("--noise-dtype", default="float32", choices=["float32", "float64"],
                        help="--batch-noise: the dtype of the model (float64: how far the routes "
                        "are apart once rounding is out of the way)")
    parser.add_argument("--generate", action="store_true",
                        help="GSM8K 5-shot generation (--limit, default 16): lm-eval's default "
                        "batch size 1 vs the fashionfuse class at --batch-size")
    parser.add_argument("--max-length", type=int, default=8192,
                        help="--prefix: eval.max_length (the demo model's own window, 512, cuts "
                        "ARC and HellaSwag prompts from the left, and cut rows are not shared; "
                        "8192 cuts none of the preset's prompts in the demo's tokens)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="--leaderboard: time each side this many times, alternating; medians")
    parser.add_argument("--compute-dtype", default="bfloat16",
                        choices=["auto", "bfloat16", "float16", "float32"],
                        help="--leaderboard: model.quantization.compute_dtype of the evals")
    parser.add_argument("--benchmarks", type=Path, default=ROOT.parent / "shared" / "benchmarks")
    parser.add_argument("--model", choices=["demo", "smollm2"], default="demo",
                        help="--prefix: the demo run, or the real model's run (runs/smollm2)")
    parser.add_argument("--models", default=None,
                        help="--prefix: eval.models (default: [base, adapters, fused] on the "
                        "demo, [base, fused] on smollm2)")
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.leaderboard:
        leaderboard(args, env)
        return
    if args.logits:
        logits_where_scored(args)
        return
    if args.prefix:
        shared_prefix(args, env)
        return
    if args.batch_noise:
        batch_noise(args)
        return
    if args.generate:
        generate(args)
        return
    ff = [sys.executable, "-m", "fashionfuse.cli"]
    common = ["--set", f"run_dir={RUN}", "--set", "eval.load_in_4bit=false",
              "--set", f"eval.batch_size={args.batch_size}", "--set", "eval.models=[base, adapters]"]
    if args.limit:
        common += ["--set", f"eval.limit={args.limit}"]
    for stage in ("curate", "train-adapter"):
        subprocess.run(ff + [stage, str(CONFIG)] + common, cwd=ROOT, env=env, check=True,
                       capture_output=True)

    one = _timed(ff + ["eval", str(CONFIG), "--force"] + common, env)
    table = json.loads((RUN / "eval" / "table.json").read_text())
    ours = {r["model"]: r for r in table["rows"]}

    include = sorted((RUN / "eval_tasks").iterdir())[0]
    models = {"base": None, **{f"adapter:{n}": RUN / "adapters" / n for n in ("chat", "orca", "alpaca")}}
    separate = 0.0
    mismatch = 0.0
    for label, adapter in models.items():
        out = RUN / "bench_lm_eval" / label.replace(":", "_")
        model_args = f"pretrained={ROOT / 'data' / 'tiny-llama'},dtype=bfloat16"
        if adapter is not None:
            model_args += f",peft={adapter}"
        cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
               "--tasks", ",".join(TASKS), "--include_path", str(include), "--num_fewshot", "0",
               "--device", "cpu", "--batch_size", str(args.batch_size), "--output_path", str(out)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        separate += _timed(cmd, env)
        res = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"]
        for t in TASKS:
            mismatch = max(mismatch, abs(100 * res[t]["acc_norm,none"] - ours[label][t]))

    print(f"models: {len(models)} (base + 3 adapters), tasks: {TASKS}, limit: {args.limit}")
    print(f"one_command_s: {one:.2f}")
    print(f"separate_commands_s: {separate:.2f}")
    print(f"max_score_difference_pct_points: {mismatch:.2f}")
    print(f"speedup_vs_separate: {separate / one:.2f}")


def leaderboard(args, env: dict) -> None:
    """Five models vs one on the leaderboard_v1 preset with --limit 5."""
    if not args.benchmarks.is_dir():
        sys.exit(f"{args.benchmarks}: benchmark files not found (pass --benchmarks)")
    ff = [sys.executable, "-m", "fashionfuse.cli"]
    common = ["--set", f"run_dir={RUN}", "--set", "eval.preset=leaderboard_v1",
              "--set", f"eval.benchmark_data={args.benchmarks}", "--set", "eval.tasks=[]",
              "--set", "eval.include_paths=[]", "--set", "eval.retention=null",
              "--set", "eval.num_fewshot=null",
              "--set", "eval.limit=5", "--set", f"eval.batch_size={args.batch_size}",
              "--set", f"model.quantization.compute_dtype={args.compute_dtype}"]
    for stage in ("curate", "train-adapter", "search-weights"):
        subprocess.run(ff + [stage, str(CONFIG), "--set", f"run_dir={RUN}"], cwd=ROOT, env=env,
                       check=True, capture_output=True)
    seconds, timings = {"one": [], "five": []}, {}
    for _ in range(args.repeats):  # alternating; medians (this machine's speed drifts)
        for label, models in (("one", "[base]"), ("five", "[base, adapters, fused]")):
            seconds[label].append(_timed(ff + ["eval", str(CONFIG), "--force", *common,
                                               "--set", f"eval.models={models}"], env))
            timings[label] = json.loads((RUN / "eval" / "timings.json").read_text())
            print(f"{label}: {seconds[label][-1]:.1f} s; {timings[label]}", flush=True)
    one, five = statistics.median(seconds["one"]), statistics.median(seconds["five"])
    if args.repeats > 1:
        print("eval_five_vs_one_per_pair: " + ", ".join(
            f"{f / o:.2f}" for o, f in zip(seconds["one"], seconds["five"])))
    print(f"eval_one_model_s: {one:.1f}")
    print(f"eval_five_models_s: {five:.1f}")
    print(f"eval_five_models_vs_one: {five / one:.2f}")


def _samples(eval_dir: Path) -> dict:
    """(model, task, doc id) -> (per-choice log-likelihoods, metrics) from logged samples."""
    out = {}
    for res_file in eval_dir.glob("*/results.json"):
        res = json.loads(res_file.read_text())
        for task, samples in (res.get("samples") or {}).items():
            for s in samples:
                lls = [float(r[0][0] if isinstance(r[0], list) else r[0]) for r in s["resps"]]
                metrics = {k: s[k] for k in ("acc", "acc_norm", "mc2") if k in s}
                if "truthfulqa" in task:  # mc2 is logged under "acc"
                    metrics = {"mc2": s["acc"]}
                out[(res_file.parent.name, task, s["doc_id"])] = (lls, metrics)
    return out


def _plain_checkpoint(model: str) -> str:
    """The demo model's folder, or SmolLM2's GGUF converted to a plain checkpoint."""
    if model != "smollm2":
        return str(ROOT / "data" / "tiny-llama")
    from fashionfuse.config import ModelConfig
    from fashionfuse.gguf_base import checkpoint_dir

    sys.path.insert(0, str(ROOT / "scripts"))
    from fetch_smollm2 import fetch_gguf

    return checkpoint_dir(ModelConfig(base=str(fetch_gguf())))


def batch_noise(args) -> None:
    """lm-eval's HFLM at batch sizes 1 and 16 and the shared route on the same ARC 25-shot and
    HellaSwag 10-shot requests, float32 (or `--noise-dtype float64`), no 4-bit: the largest log-likelihood difference of
    each pair (the demo model, or SmolLM2's converted checkpoint with --model smollm2)."""
    import itertools

    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fashionfuse.evaluate.benchmarks import write_local_leaderboard_tasks
    from fashionfuse.evaluate.lm_eval_run import task_manager, wrap_model

    model_dir = _plain_checkpoint(args.model)
    limit = args.limit or (4 if args.model == "smollm2" else 10)
    include = write_local_leaderboard_tasks(args.benchmarks, RUN / "batch_noise_tasks")
    dtype = getattr(torch, args.noise_dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    manager, requests = task_manager([str(include)], []), []
    for task, shots in (("local_arc_challenge", 25), ("local_hellaswag", 10)):
        t = manager.load([task])["tasks"][task]
        t.set_config(key="num_fewshot", value=shots)
        t.set_fewshot_seed(seed=1234)
        t.build_all_requests(limit=limit, rank=0, world_size=1)
        requests += list(t.instances)
    ml = args.max_length
    scored = {}
    for label, lm in (("hflm_batch16", HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16,
                                            max_length=ml)),
                      ("hflm_batch1", HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1,
                                           max_length=ml)),
                      ("shared_batch16", wrap_model(model, tokenizer, 16, max_length=ml))):
        scored[label] = [r[0] for r in lm.loglikelihood(requests, disable_tqdm=True)]
    print(f"requests: {len(requests)} ({args.model}, {args.noise_dtype}, ARC 25-shot + "
          f"HellaSwag 10-shot, limit {limit})")
    for a, b in itertools.combinations(scored, 2):
        diff = max(abs(x - y) for x, y in zip(scored[a], scored[b]))
        print(f"max_loglikelihood_difference_{a}_vs_{b}: {diff:.2e}")


def _local_gsm8k(benchmarks: Path, out: Path) -> Path:
    """lm-eval's own gsm8k task (its YAML included: prompt, stop sequences, filters, metric)
    on the local GSM8K test file, 5-shot from the local train file."""
    import lm_eval

    train = benchmarks.parent / "raw" / "gsm8k_train.jsonl"
    test = benchmarks / "gsm8k" / "test.jsonl"
    for f in (train, test):
        if not f.is_file():
            sys.exit(f"--generate needs {f} (../shared)")
    own = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    out.mkdir(parents=True, exist_ok=True)
    (out / "local_gsm8k.yaml").write_text(
        f"include: {own}\ntask: local_gsm8k\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {train}\n    test: {test}\n")
    return out


def generate(args) -> None:
    """GSM8K 5-shot (lm-eval's generate_until task) on SmolLM2 (or the demo model), float32:
    lm-eval's default (HFLM, batch size 1), HFLM at `--batch-size` (transformers' `generate`:
    a batch runs until its last row stops) and the class `fashionfuse eval` uses at
    `--batch-size` (finished rows leave the batch and the KV cache): seconds, outputs
    identical to the default's, strict-match exact match of each."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fashionfuse.evaluate.lm_eval_run import task_manager, wrap_model

    model_dir = _plain_checkpoint(args.model)
    limit = args.limit or 16
    include = _local_gsm8k(args.benchmarks, RUN / "gsm8k_task")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = task_manager([str(include)], []).load(["local_gsm8k"])["tasks"]["local_gsm8k"]
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    requests = list(task.instances)
    runs = {}
    for label, lm in (("lm_eval_default_batch1", HFLM(pretrained=model, tokenizer=tokenizer,
                                                      batch_size=1)),
                      (f"hflm_batch{args.batch_size}", HFLM(pretrained=model, tokenizer=tokenizer,
                                                            batch_size=args.batch_size)),
                      (f"fashionfuse_batch{args.batch_size}",
                       wrap_model(model, tokenizer, args.batch_size))):
        lm.generate_until(requests[:1], disable_tqdm=True)  # warm-up, untimed
        t0 = time.perf_counter()
        texts = lm.generate_until(requests, disable_tqdm=True)
        seconds = time.perf_counter() - t0
        for inst, text in zip(requests, texts):
            inst.resps = [text]
        task.apply_filters()
        correct = [task.process_results(inst.doc, [inst.filtered_resps["strict-match"]])
                   ["exact_match"] for inst in requests]
        runs[label] = (seconds, texts, sum(correct))
        print(f"{label}: {seconds:.1f} s, strict-match exact match {sum(correct)}/{len(requests)}")
    (slow, ref, _), (batched, hf, _), (fast, ours, _) = runs.values()
    gen_tokens = sum(len(tokenizer(t)["input_ids"]) for t in ref)
    print(f"items: {len(requests)} ({args.model}, GSM8K 5-shot, float32), generated tokens "
          f"(batch 1, after the stop sequence cut): {gen_tokens}")
    print(f"identical_outputs_hflm_batched_vs_default: {sum(a == b for a, b in zip(ref, hf))}"
          f"/{len(requests)}")
    print(f"identical_outputs: {sum(a == b for a, b in zip(ref, ours))}/{len(requests)}")
    print(f"hflm_batched_speedup_vs_lm_eval_default: {slow / batched:.2f}")
    print(f"generate_speedup_vs_lm_eval_default: {slow / fast:.2f}")


def shared_prefix(args, env: dict) -> None:
    """leaderboard_v1 on five models with and without shared contexts; then the objective."""
    if not args.benchmarks.is_dir():
        sys.exit(f"{args.benchmarks}: benchmark files not found (pass --benchmarks)")
    ff = [sys.executable, "-m", "fashionfuse.cli"]
    config, run, models = CONFIG, RUN, args.models or "[base, adapters, fused]"
    if args.model == "smollm2":
        from fashionfuse.rundir import link_shared

        config, run = ROOT / "configs" / "smollm2.yaml", ROOT / "runs" / "bench_eval_smollm2"
        models = args.models or "[base, fused]"
        if not (ROOT / "runs" / "smollm2" / "search" / "fused").is_dir():
            sys.exit("runs/smollm2 has no fused adapter: run `make real` first")
        link_shared(ROOT / "runs" / "smollm2", run, ("curate", "adapters", "search"))
    else:
        for stage in ("curate", "train-adapter", "search-weights"):
            subprocess.run(ff + [stage, str(config), "--set", f"run_dir={run}"], cwd=ROOT,
                           env=env, check=True, capture_output=True)
    limit = args.limit or (4 if args.model == "smollm2" else 20)
    common = ["--set", f"run_dir={run}", "--set", "eval.preset=leaderboard_v1",
              "--set", f"eval.benchmark_data={args.benchmarks}", "--set", "eval.tasks=[]",
              "--set", "eval.include_paths=[]", "--set", "eval.retention=null",
              "--set", "eval.num_fewshot=null",
              "--set", f"eval.limit={limit}", "--set", f"eval.batch_size={args.batch_size}",
              "--set", "eval.log_samples=true", "--set", f"eval.models={models}",
              "--set", "eval.skill_tasks=false",
              "--set", f"model.quantization.compute_dtype={args.compute_dtype}",
              "--set", f"eval.max_length={args.max_length}"]
    seconds, tokens, samples, tables = {}, {}, {}, {}
    for route, flag in (("plain", "false"), ("shared", "true")):
        total = _timed(ff + ["eval", str(config), "--force", *common,
                             "--set", f"eval.shared_contexts={flag}"], env)
        timings = json.loads((run / "eval" / "timings.json").read_text())
        seconds[route] = sum(timings["models_s"].values())
        tokens[route] = sum(timings["tokens_through_model"].values())
        samples[route] = _samples(run / "eval")
        tables[route] = json.loads((run / "eval" / "table.json").read_text())
        print(f"{route}: command {total:.1f} s, scoring {seconds[route]:.1f} s, "
              f"{tokens[route]:,} token positions", flush=True)
    assert samples["plain"].keys() == samples["shared"].keys() and samples["plain"]
    plain, shared = samples["plain"], samples["shared"]
    diff = max(abs(a - b) for k in plain for a, b in zip(plain[k][0], shared[k][0]))
    flipped = sum(plain[k][1].get(m) != shared[k][1].get(m) for k in plain
                  for m in ("acc", "acc_norm"))
    mc2 = max((abs(plain[k][1]["mc2"] - shared[k][1]["mc2"]) for k in plain
               if "mc2" in plain[k][1]), default=0.0)
    print(f"items: {len(samples['plain'])} ({args.model}, models {models}, leaderboard_v1, "
          f"limit {limit}), compute dtype {args.compute_dtype}")
    print(f"max_loglikelihood_difference: {diff:.2e}")
    print(f"acc_or_acc_norm_flips: {flipped}")
    print(f"max_mc2_difference: {mc2:.2e}")
    print(f"tables_identical: {tables['plain']['rows'] == tables['shared']['rows']}")
    print(f"prefix_tokens_ratio: {tokens['plain'] / tokens['shared']:.2f}")
    print(f"leaderboard_speedup_vs_plain: {seconds['plain'] / seconds['shared']:.2f}")
    if args.model == "demo":
        task_objective(args, limit)


def task_objective(args, limit: int) -> None:
    """One candidate of the search's lm_eval objective (ARC 25-shot, HellaSwag 10-shot) on the
    resident 4-bit model with the fused weights set, plain vs shared contexts."""
    from fashionfuse.base_model import load_base_model, load_tokenizer
    from fashionfuse.config import load_config
    from fashionfuse.evaluate.benchmarks import write_local_leaderboard_tasks
    from fashionfuse.evaluate.lm_eval_run import TaskSet, task_manager, wrap_model
    from fashionfuse.adapters.runtime import attach_adapters, set_fusion_weights

    cfg = load_config(CONFIG, [f"run_dir={RUN}",
                               f"model.quantization.compute_dtype={args.compute_dtype}"])
    best = json.loads((RUN / "search" / "best.json").read_text())["best_weights"]
    model = attach_adapters(load_base_model(cfg.model, device="cpu"),
                            {n: RUN / "adapters" / n for n in best})
    set_fusion_weights(model, best)
    tokenizer = load_tokenizer(cfg.model)
    tasks_dir = write_local_leaderboard_tasks(str(args.benchmarks), RUN / "bench_prefix_tasks")
    manager = task_manager([str(tasks_dir)], ["local_arc_challenge", "local_hellaswag"])
    seconds, scores = {}, {}
    for route in ("plain", "shared"):
        runs = []
        for name, shots in (("local_arc_challenge", 25), ("local_hellaswag", 10)):
            task_set = TaskSet(manager, [name], num_fewshot=shots, seed=cfg.seed)
            lm = wrap_model(model, tokenizer, args.batch_size, shared_contexts=route == "shared",
                            max_length=args.max_length)
            t0 = time.perf_counter()
            res = task_set.score(lm, limit=limit)
            runs.append(time.perf_counter() - t0)
            scores[(route, name)] = res["results"][name]["acc_norm,none"]
        seconds[route] = sum(runs)
        print(f"objective {route}: {seconds[route]:.1f} s per candidate", flush=True)
    same = all(scores[("plain", n)] == scores[("shared", n)]
               for n in ("local_arc_challenge", "local_hellaswag"))
    print(f"task_objective_scores_identical: {same}")
    print(f"task_objective_speedup: {seconds['plain'] / seconds['shared']:.2f}")


def logits_where_scored(args) -> None:
    """Plain HFLM vs fashionfuse's wrapper on 64 requests of 300-500 context tokens and 1-10
    continuation tokens, batch `--batch-size`, a 32k-vocabulary random Llama in float32."""
    import random

    import torch
    from bench_models import SIZES
    from bench_train import peak_rss
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fashionfuse.evaluate.lm_eval_run import wrap_model

    hidden, layers, inter, heads, kv = SIZES["30m"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "tiny-llama")
    rng = random.Random(0)
    requests = [(None, [rng.randrange(3, 32000) for _ in range(rng.randint(300, 500))],
                 [rng.randrange(3, 32000) for _ in range(rng.randint(1, 10))]) for _ in range(64)]
    largest = [0]
    model.lm_head.register_forward_hook(
        lambda m, i, o: largest.__setitem__(0, max(largest[0], o.numel())))
    routes = {"wrapped": wrap_model(model, tokenizer, args.batch_size),
              "plain": HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)}
    seconds, memory, logits_mib, results = {}, {}, {}, {}
    for name, lm in routes.items():  # the smaller route first: its peak is not the other's
        largest[0] = 0
        with peak_rss(memory, name):
            t0 = time.perf_counter()
            results[name] = lm._loglikelihood_tokens(requests, disable_tqdm=True)
            seconds[name] = time.perf_counter() - t0
        logits_mib[name] = largest[0] * 4 / 2 ** 20
        print(f"{name}: {seconds[name]:.1f} s, largest logits {logits_mib[name]:.0f} MiB, "
              f"peak RSS {memory[name]:.0f} MiB", flush=True)
    diff = max(abs(a[0] - b[0]) for a, b in zip(results["wrapped"], results["plain"]))
    same_greedy = all(a[1] == b[1] for a, b in zip(results["wrapped"], results["plain"]))
    print(f"max_loglikelihood_difference: {diff:.2e}")
    print(f"greedy_flags_identical: {same_greedy}")
    print(f"largest_logits_mib_plain: {logits_mib['plain']:.0f}")
    print(f"largest_logits_mib_wrapped: {logits_mib['wrapped']:.0f}")
    print(f"peak_rss_mib_plain: {memory['plain']:.0f}")
    print(f"peak_rss_mib_wrapped: {memory['wrapped']:.0f}")
    print(f"loglikelihood_speedup_32k_vocab: {seconds['plain'] / seconds['wrapped']:.2f}")


if __name__ == "__main__":
    main()
