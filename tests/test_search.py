"""search-weights through the CLI: grid coverage, exact fused export, resume, reproducibility."""

from __future__ import annotations

import json
import os
import shutil

import optuna
import pytest
import torch
from typer.testing import CliRunner

from fashionfuse.cli import app
from fashionfuse.config import SearchConfig, load_config
from fashionfuse.adapters.saved import FusionError, load_saved_adapter, weighted_delta
from fashionfuse.search.methods.grid import candidates as grid_candidates
from fashionfuse.search.methods.random import candidates as random_candidates
from fashionfuse.search.pipeline import search_weights

from fashionfuse.search.study import study_storage

from .conftest import stop_after

runner = CliRunner()


def test_grid_search_covers_the_whole_product(pipeline_run):
    search = pipeline_run["run_dir"] / "search"
    trials = json.loads((search / "trials.json").read_text())
    combos = {tuple(t["weights"][n] for n in ("chat", "orca")) for t in trials}
    assert combos == {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)} and len(trials) == 4
    best = json.loads((search / "best.json").read_text())
    assert best["best_score"] == min(t["score"] for t in trials)
    scores = {tuple(t["weights"].values()): t["score"] for t in trials}
    assert len(set(scores.values())) == 4, "different weights must give different losses"
    assert (search / "search.png").stat().st_size > 1000
    assert (search / "trials.csv").read_text().startswith("number,w_chat,w_orca,score")


def test_exported_fused_adapter_is_exact(pipeline_run):
    run = pipeline_run["run_dir"]
    best = json.loads((run / "search" / "best.json").read_text())
    names = best["adapters"]
    adapters = [load_saved_adapter(run / "adapters" / n) for n in names]
    want = weighted_delta(adapters, [best["best_weights"][n] for n in names])
    fused = load_saved_adapter(run / "search" / "fused")
    got = weighted_delta([fused], [1.0])
    for mod in want:
        torch.testing.assert_close(got[mod], want[mod], rtol=1e-5, atol=1e-7)


def test_candidate_scores_come_from_the_fused_model(pipeline_run):
    """Re-score the best candidate through the exported adapter: same loss as in the search."""
    from peft import PeftModel

    from fashionfuse.base_model import load_base_model, load_tokenizer
    from fashionfuse.search.objectives import ValidationLoss

    cfg = load_config(pipeline_run["config"])
    run = pipeline_run["run_dir"]
    best = json.loads((run / "search" / "best.json").read_text())
    if all(w == 0 for w in best["best_weights"].values()):
        pytest.skip("base model won the search; nothing fused to re-score")
    model = PeftModel.from_pretrained(load_base_model(cfg.model, device="cpu"), run / "search" / "fused")
    objective = ValidationLoss.from_config(cfg, load_tokenizer(cfg.model), "cpu")
    per = objective.per_dataset(model.eval())
    for name, loss in best["best_per_dataset"].items():
        assert per[name] == pytest.approx(loss, rel=2e-3)


def test_random_search_is_reproducible_from_seed():
    cfg = SearchConfig(method="random", n_trials=6, low=0.0, high=1.0, step=0.05)
    a = random_candidates(cfg, ["x", "y"], seed=3)
    assert a == random_candidates(cfg, ["x", "y"], seed=3)
    assert a != random_candidates(cfg, ["x", "y"], seed=4)
    assert all(0.0 <= v <= 1.0 and abs(v / 0.05 - round(v / 0.05)) < 1e-6 for c in a for v in c.values())
    assert len(grid_candidates(SearchConfig(grid_values=[0, 0.5, 1]), ["a", "b", "c"], 0)) == 27


def test_killed_search_resumes_without_repeating_trials(pipeline_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("search*", "eval*"))
    cfg = load_config(pipeline_run["config"], [f"run_dir={run}", "search.method=random",
                                                "search.n_trials=5"])
    with pytest.raises(KeyboardInterrupt):
        search_weights(cfg, progress=stop_after(2))
    assert not (run / "search").exists()
    storage = study_storage(load_config(pipeline_run["config"], [f"run_dir={run}"]))
    (summary,) = optuna.get_all_study_summaries(storage)
    killed = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert len([t for t in killed.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 2
    result = search_weights(cfg)
    assert result["n_trials"] == 5
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 5
    assert sorted(t.user_attrs["candidate"] for t in done) == [0, 1, 2, 3, 4]
    expected = random_candidates(cfg.search, ["chat", "orca"], cfg.seed)
    assert [t.params for t in sorted(done, key=lambda t: t.user_attrs["candidate"])] == expected


def test_tpe_sampler_runs_its_trial_budget(pipeline_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("search*", "eval*"))
    cfg = load_config(pipeline_run["config"], [f"run_dir={run}", "search.method=tpe",
                                                "search.n_trials=3"])
    result = search_weights(cfg)
    assert result["n_trials"] == 3 and result["method"] == "tpe"


def test_gp_sampler_starts_from_the_uniform_point(pipeline_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("search*", "eval*"))
    over = [f"run_dir={run}", "search.method=gp", "search.gp_startup_trials=2", "search.step=0.1"]
    result = search_weights(load_config(pipeline_run["config"], [*over, "search.n_trials=4"]))
    trials = json.loads((run / "search" / "trials.json").read_text())
    assert result["n_trials"] == 4 and result["method"] == "gp"
    assert trials[0]["weights"] == {"chat": 0.5, "orca": 0.5}
    assert all(round(v * 10, 6).is_integer() for t in trials for v in t["weights"].values())


def test_search_is_skipped_when_up_to_date(pipeline_run):
    result = runner.invoke(app, ["search-weights", str(pipeline_run["config"])])
    assert result.exit_code == 0 and "search: up to date" in result.output


def test_search_without_adapters_fails_clearly(make_config):
    result = runner.invoke(app, ["search-weights", str(make_config())])
    assert result.exit_code == 2 and "adapters missing" in result.output


def test_gradient_method_learns_weights_that_lower_the_objective(pipeline_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("search*", "eval*"))
    cfg = load_config(pipeline_run["config"], [f"run_dir={run}", "search.method=gradient",
                                                "search.gradient_steps=8", "search.gradient_lr=0.1",
                                                "search.low=0.0", "search.high=2.0"])
    result = search_weights(cfg)
    trials = json.loads((run / "search" / "trials.json").read_text())
    start, learned = trials
    assert start["weights"] == {"chat": 1.0, "orca": 1.0}
    assert learned["weights"] != start["weights"]
    assert learned["score"] < start["score"]
    assert result["best_weights"] == learned["weights"]
    assert all(0.0 <= v <= 2.0 for v in learned["weights"].values())


def test_merged_export_uses_dequantised_nf4_weights(pipeline_run, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from fashionfuse.base_model import load_base_model
    from fashionfuse.fusion.export import export_merged_model, trained_quantization
    from fashionfuse.rundir import read_manifest

    cfg = load_config(pipeline_run["config"])
    fused_dir = pipeline_run["run_dir"] / "search" / "fused"
    out = tmp_path / "merged"
    with pytest.raises(FusionError, match="quantisation record"):  # a fused dir has no manifest
        export_merged_model(cfg.model, fused_dir, out, dtype=torch.float32)
    record = trained_quantization({n: read_manifest(pipeline_run["run_dir"] / "adapters" / n)
                                   for n in ("chat", "orca")})
    report = export_merged_model(cfg.model, fused_dir, out, dtype=torch.float32,
                                 quantization=record)
    assert report["dtype"] == "float32" and report["update_relative_error"] < 1e-3
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(cfg.model.base, dtype=torch.float32)
    quantized = load_base_model(cfg.model, device="cpu")
    delta = weighted_delta([load_saved_adapter(fused_dir)], [1.0])
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    name = key.removeprefix("base_model.model.")
    q = quantized.get_submodule(name).weight
    dequant = bnb.functional.dequantize_4bit(q.data, q.quant_state).float()
    want = dequant + delta[key].float()
    torch.testing.assert_close(merged.get_submodule(name).weight, want)
    assert not torch.allclose(merged.get_submodule(name).weight,
                              original.get_submodule(name).weight + delta[key].float())
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    assert torch.isfinite(merged(ids).logits).all()


def test_successive_halving_prunes_weak_candidates_early(pipeline_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("search*", "eval*"))
    cfg = load_config(pipeline_run["config"], [
        f"run_dir={run}", "search.grid_values=[0.0, 0.25, 0.5, 0.75, 1.0]", "search.batch_size=1",
        "search.halving_fractions=[0.34, 0.67, 1.0]"])
    result = search_weights(cfg)
    assert result["n_trials"] + result["n_pruned"] == 25 and result["n_pruned"] > 0
    storage = study_storage(load_config(pipeline_run["config"], [f"run_dir={run}"]))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(t.user_attrs["fraction_evaluated"] < 1.0 for t in pruned)
    # the kept best is the best of the fully evaluated candidates
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert result["best_score"] == min(t.value for t in complete)
    # resuming runs nothing more: pruned candidates are not retried
    again = load_config(pipeline_run["config"], [
        f"run_dir={run}", "search.grid_values=[0.0, 0.25, 0.5, 0.75, 1.0]", "search.batch_size=1",
        "search.halving_fractions=[0.34, 0.67, 1.0]"])
    shutil.rmtree(run / "search")
    assert search_weights(again)["n_trials"] == result["n_trials"]
    assert len(optuna.load_study(study_name=summary.study_name, storage=storage).trials) == 25


def _validation_task(folder, data_file):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dev_colours.yaml").write_text(
        "task: dev_colours\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {data_file}\nvalidation_split: validation\noutput_type: multiple_choice\n"
        "doc_to_text: \"USER: {{question}}\\nASSISTANT:\"\ndoc_to_target: answer\n"
        "doc_to_choice: \"{{choices}}\"\nmetric_list:\n  - metric: acc\n")
    return folder


def test_lm_eval_objective_scores_candidates_on_a_validation_task(pipeline_run, tmp_path, demo_data):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("search*", "eval*"))
    tasks = _validation_task(tmp_path / "tasks", demo_data["tasks"] / "demo_colours.jsonl")
    cfg = load_config(pipeline_run["config"], [
        f"run_dir={run}", "search.objective.type=lm_eval", "search.objective.tasks=[dev_colours]",
        f"search.objective.include_paths=[{tasks}]", "search.objective.limit=8"])
    result = search_weights(cfg)
    trials = json.loads((run / "search" / "trials.json").read_text())
    assert len(trials) == 4
    for t in trials:
        acc = t["per_dataset"]["task:dev_colours"]
        assert 0.0 <= acc <= 1.0 and t["score"] == pytest.approx(-acc)
    assert result["best_score"] == min(t["score"] for t in trials)


def test_mix_objective_with_a_retention_term(pipeline_run, tmp_path, demo_data):
    """`mix` with `retention`: each candidate's score is (1 - mix_weight) * validation loss -
    mix_weight * task accuracy - retention.weight * retention accuracy, the retention task
    scored with its own limit; the term enters the search's fingerprint only when set."""
    from fashionfuse.search.pipeline import search_fingerprint

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("search*", "eval*"))
    tasks = _validation_task(tmp_path / "tasks", demo_data["tasks"] / "demo_colours.jsonl")
    (tasks / "dev_filler.yaml").write_text(
        "task: dev_filler\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {demo_data['tasks'] / 'demo_filler.jsonl'}\n"
        "validation_split: validation\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_target: answer\n"
        "doc_to_choice: \"{{choices}}\"\nmetric_list:\n  - metric: acc\n")
    base = [f"run_dir={run}", "search.objective.type=mix", "search.objective.tasks=[dev_colours]",
            f"search.objective.include_paths=[{tasks}]", "search.objective.limit=8",
            "search.objective.mix_weight=0.4"]
    cfg = load_config(pipeline_run["config"], base + [
        "search.objective.retention={tasks: [dev_filler], weight: 0.25, limit: 5}"])
    assert search_fingerprint(cfg) != search_fingerprint(load_config(pipeline_run["config"], base))
    search_weights(cfg)
    trials = json.loads((run / "search" / "trials.json").read_text())
    assert len(trials) == 4
    for t in trials:
        per = t["per_dataset"]
        val = (per["chat"] + per["orca"]) / 2
        ret = per["retention:dev_filler"]
        assert ret in {k / 5 for k in range(6)}  # its own limit: 5 items
        assert t["score"] == pytest.approx(0.6 * val - 0.4 * per["task:dev_colours"] - 0.25 * ret)


def test_tuning_on_a_test_split_is_refused(pipeline_run, tmp_path, demo_data):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("search*", "eval*"))
    result = runner.invoke(app, ["search-weights", str(pipeline_run["config"]), "--set", f"run_dir={run}",
                                 "--set", "search.objective.type=lm_eval",
                                 "--set", "search.objective.tasks=[demo_colours]",
                                 "--set", f"search.objective.include_paths=[{demo_data['tasks']}]"])
    assert result.exit_code == 2
    assert "demo_colours is scored on its test split" in result.output


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on loopback; skips when none can be started here."""
    pytest.importorskip("psycopg2")
    from . import postgres_server

    try:
        url, stop = postgres_server.start()
    except postgres_server.Unavailable as exc:
        pytest.skip(f"no PostgreSQL server: {exc}")
    yield url
    stop()


def test_two_workers_share_one_study_on_postgresql(pipeline_run, tmp_path, postgres_url):
    """Two worker processes on one PostgreSQL study: every grid candidate runs exactly once,
    and both workers take part."""
    import os
    import subprocess
    import sys

    from fashionfuse.search.pipeline import search_fingerprint

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("search*", "eval"))
    values = [round(i / 7, 4) for i in range(8)]  # 8 x 8 = 64 candidates
    overrides = ["--set", f"run_dir={run}", "--set", f"search.storage={postgres_url}",
                 "--set", f"search.grid_values={values}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fashionfuse", "search-weights", str(pipeline_run["config"]),
           *overrides]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]
    cfg = load_config(pipeline_run["config"], [f"run_dir={run}", f"search.storage={postgres_url}",
                                               f"search.grid_values={values}"])
    study = optuna.load_study(study_name=f"fusion-{search_fingerprint(cfg)}", storage=postgres_url)
    complete = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    indices = sorted(t.user_attrs["candidate"] for t in complete)
    assert indices == list(range(64)), "a candidate ran twice or was lost"
    assert len({t.user_attrs["worker"] for t in complete}) == 2, "one worker did everything"
    assert json.loads((run / "search" / "best.json").read_text())["n_trials"] == 64


def test_halving_with_two_fractions_prunes_at_the_first_rung(pipeline_run, tmp_path):
    """Reports count from step 1, the pruner's first rung: with [0.5, 1.0] weak candidates are
    stopped after half the data (before the fix nothing was ever pruned)."""
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("search*", "eval*"))
    cfg = load_config(pipeline_run["config"], [
        f"run_dir={run}", "search.grid_values=[0.0, 0.25, 0.5, 0.75, 1.0]", "search.batch_size=1",
        "search.halving_fractions=[0.5, 1.0]"])
    result = search_weights(cfg)
    assert result["n_trials"] + result["n_pruned"] == 25 and result["n_pruned"] > 0


def test_halving_stages_are_a_seeded_random_sample(pipeline_run, tmp_path):
    """The first stage is not the shortest examples (a biased slice) but a seeded shuffle;
    every example is scored exactly once over the stages."""
    from fashionfuse.base_model import load_tokenizer
    from fashionfuse.search.objectives import ValidationLoss

    cfg = load_config(pipeline_run["config"], [
        "search.batch_size=1", "search.objective.max_samples_per_dataset=null",
        "search.halving_fractions=[0.5, 1.0]"])
    tok = load_tokenizer(cfg.model)
    obj = ValidationLoss.from_config(cfg, tok, "cpu")
    again = ValidationLoss.from_config(cfg, tok, "cpu")
    shortest_first = []
    for name, batches in obj.batches.items():
        lengths = [int(b["input_ids"].shape[1]) for b in batches]
        first = lengths[:obj.stage_ends[name][0]]
        assert len(lengths) == obj.stage_ends[name][-1] >= 6
        shortest_first.append(sorted(first) == sorted(lengths)[:len(first)])
        assert [b["input_ids"].tolist() for b in again.batches[name]] == \
            [b["input_ids"].tolist() for b in batches]  # seeded
    assert not all(shortest_first), "the first stage holds the shortest examples"


def test_tpe_workers_get_their_own_seeds_and_respect_step():
    """Two workers on one study must not propose the same points; TPE stays on the step grid."""
    from fashionfuse.search.methods import tpe
    from fashionfuse.search.study import worker_seed

    cfg = SearchConfig(method="tpe", low=0.0, high=1.0, step=0.05)
    dists = tpe.distributions(cfg, ["a", "b", "c"])
    assert worker_seed(7, None) == 7
    seeds = {worker_seed(7, w) for w in ("host:1", "host:2")}
    assert len(seeds) == 2
    study = optuna.create_study(sampler=tpe.sampler(cfg, 0))
    asked = []
    for seed in seeds:
        other = optuna.load_study(study_name=study.study_name, storage=study._storage,
                                  sampler=tpe.sampler(cfg, seed))
        asked.append([other.ask(dists).params for _ in range(4)])
    assert asked[0] != asked[1]
    for params in asked[0] + asked[1]:
        for v in params.values():
            assert abs(v / 0.05 - round(v / 0.05)) < 1e-9


def test_search_worker_ids(pipeline_run, monkeypatch):
    from fashionfuse.search.study import search_worker_id

    cfg = load_config(pipeline_run["config"])
    monkeypatch.delenv("FASHIONFUSE_WORKER", raising=False)
    assert search_worker_id(cfg) is None  # a lone worker on the run dir's SQLite: seed as given
    shared = load_config(pipeline_run["config"], ["search.storage=sqlite:///x.db"])
    assert search_worker_id(shared).endswith(f":{os.getpid()}")
    monkeypatch.setenv("FASHIONFUSE_WORKER", "w3")
    assert search_worker_id(shared) == "w3"


def test_retrained_adapter_with_new_weights_invalidates_search(pipeline_run, tmp_path, monkeypatch):
    """Downstream fingerprints hash the adapter *weights*: an adapter retrained to other bytes
    (nondeterministic GPU kernels, say) makes the search stale even with the same config."""
    from fashionfuse.rundir import is_up_to_date
    from fashionfuse.search.pipeline import search_fingerprint
    from fashionfuse.train import trainer

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("eval*"))
    cfg = load_config(pipeline_run["config"], [f"run_dir={run}"])
    assert is_up_to_date(run / "search", search_fingerprint(cfg))
    real_seed = trainer._seed_everything
    monkeypatch.setattr(trainer, "_seed_everything", lambda seed: real_seed(seed + 1))
    trainer.train_adapters(cfg, ["chat"], force=True)
    assert not is_up_to_date(run / "search", search_fingerprint(cfg))


def test_force_starts_a_fresh_study(pipeline_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("eval*"))
    result = runner.invoke(app, ["search-weights", str(pipeline_run["config"]),
                                 "--set", f"run_dir={run}", "--force"])
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.output and "4 trials" in result.output
    storage = study_storage(load_config(pipeline_run["config"], [f"run_dir={run}"]))
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.n_trials == 4  # the old trials were discarded, not reused


def test_eval_fingerprint_hashes_task_files(pipeline_run, tmp_path, demo_data):
    from fashionfuse.evaluate.harness import eval_fingerprint, models_to_evaluate

    tasks = tmp_path / "tasks"
    shutil.copytree(demo_data["tasks"], tasks)
    cfg = load_config(pipeline_run["config"], [f"eval.include_paths=[{tasks}]"])
    before = eval_fingerprint(cfg, models_to_evaluate(cfg))
    yaml_file = tasks / "demo_colours.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("acc_norm", "acc"))
    assert eval_fingerprint(cfg, models_to_evaluate(cfg)) != before


def test_search_fingerprint_holds_only_what_the_method_reads(make_config):
    """A grid search is not redone when a gradient-only setting changes (ablate's learned
    variants set them), and is when its grid changes; storage settings never count."""
    from fashionfuse.config import load_config
    from fashionfuse.search.pipeline import search_fingerprint

    def fp(**search):
        return search_fingerprint(load_config(make_config(search=search)))

    grid = fp(method="grid")
    assert fp(method="grid", gradient_steps=3, gradient_lr=0.5, stale_after_s=5) == grid
    assert fp(method="grid", grid_values=[0.0, 0.25, 1.0]) != grid
    assert fp(method="gradient", gradient_steps=3) != fp(method="gradient", gradient_steps=4)


def test_tpe_proposals_move_to_where_the_objective_is_low():
    """TPE models the finished trials: after its random start its proposals gather near the
    optimum of a smooth objective, far closer than uniform draws (a random sampler fails)."""
    import numpy as np

    from fashionfuse.search.methods import tpe

    cfg = SearchConfig(method="tpe", low=0.0, high=1.0, step=0.05)
    names = ["a", "b", "c"]
    target = {"a": 0.9, "b": 0.1, "c": 0.6}

    def loss(params):
        return sum((params[k] - target[k]) ** 2 for k in names)

    study = optuna.create_study(sampler=tpe.sampler(cfg, 0))
    study.optimize(lambda t: loss({k: t.suggest_float(k, 0.0, 1.0, step=0.05) for k in names}),
                   n_trials=40)
    late = np.mean([t.value for t in study.trials[-10:]])
    rng = np.random.default_rng(0)
    uniform = np.mean([loss(dict(zip(names, rng.uniform(0, 1, 3)))) for _ in range(2000)])
    assert late < 0.35 * uniform, (late, uniform)


def test_cmaes_proposals_move_to_where_the_objective_is_low():
    """CMA-ES adapts its Gaussian to the better candidates: its late proposals sit far closer
    to the optimum of a smooth objective than uniform draws, on the step lattice."""
    import numpy as np

    from fashionfuse.search.methods import cmaes

    cfg = SearchConfig(method="cmaes", low=0.0, high=1.0, step=0.05)
    names = ["a", "b", "c"]
    target = {"a": 0.9, "b": 0.1, "c": 0.6}
    dists = cmaes.distributions(cfg, names)

    def loss(params):
        return sum((params[k] - target[k]) ** 2 for k in names)

    study = optuna.create_study(sampler=cmaes.sampler(cfg, 0))
    for _ in range(40):
        trial = study.ask(dists)
        study.tell(trial, loss(trial.params))
    late = np.mean([t.value for t in study.trials[-10:]])
    rng = np.random.default_rng(0)
    uniform = np.mean([loss(dict(zip(names, rng.uniform(0, 1, 3)))) for _ in range(2000)])
    assert late < 0.35 * uniform, (late, uniform)
    assert all(abs(v / 0.05 - round(v / 0.05)) < 1e-9 for t in study.trials for v in t.params.values())


def test_cmaes_search_starts_from_the_uniform_point(pipeline_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("search*", "eval*"))
    over = [f"run_dir={run}", "search.method=cmaes", "search.step=0.1", "search.n_trials=4"]
    result = search_weights(load_config(pipeline_run["config"], over))
    trials = json.loads((run / "search" / "trials.json").read_text())
    assert result["n_trials"] == 4 and result["method"] == "cmaes"
    assert trials[0]["weights"] == {"chat": 0.5, "orca": 0.5}


def test_a_grid_too_large_is_refused_by_validation_naming_the_samplers(make_config):
    """3 values over 16 adapters are 43 million candidates: refused in one line before any
    work (it used to build them all in memory and die with a MemoryError)."""
    import yaml

    from fashionfuse.config import ConfigError, load_config

    path = make_config()
    data = yaml.safe_load(path.read_text())
    base = data["datasets"][0]
    data["datasets"] = [{**base, "name": f"d{k}"} for k in range(16)]
    data["search"] = {"method": "grid", "grid_values": [0.0, 0.5, 1.0]}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    (line,) = [p for p in err.value.problems if "search.method" in p]
    assert "43,046,721 candidates" in line and "gp, tpe, cmaes or random" in line
    data["datasets"] = data["datasets"][:8]  # 6,561: allowed
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).search.method == "grid"


def test_stored_weights_are_the_lattice_points_not_float_noise():
    """optuna's draws on a 0.05 lattice come as 0.35000000000000003: trials.json and best.json
    hold 0.35."""
    import types

    import optuna

    from fashionfuse.search.pipeline import _trials

    study = optuna.create_study()
    dist = optuna.distributions.FloatDistribution(0.0, 1.0, step=0.05)
    study.add_trial(optuna.trial.create_trial(params={"a": 0.35000000000000003, "b": 0.7},
                                              distributions={"a": dist, "b": dist}, value=1.0))
    ctx = types.SimpleNamespace(
        study=study, param_names=["a", "b"],
        fusion=types.SimpleNamespace(weights=lambda p: dict(p)),
        cfg=types.SimpleNamespace(search=types.SimpleNamespace(operator="sum")))
    (row,) = _trials(ctx)
    assert row["weights"] == {"a": 0.35, "b": 0.7}
    assert repr(row["weights"]["a"]) == "0.35"
