"""`fashionfuse ablate`: every Table 7/8 variant built from the right inputs and scored by the same
eval, with the comparison against the best single adapter."""

from __future__ import annotations

import html
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fashionfuse.cli import app

runner = CliRunner()


def test_ablate_builds_and_scores_every_variant(pipeline_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("eval*"))
    args = ["ablate", str(pipeline_run["config"]), "--set", f"run_dir={run}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    # the run's own adapters and search were reused, not rebuilt
    assert "train chat: up to date" in result.output and "search: up to date" in result.output

    adapters = run / "adapters"
    # ablate trains its variants one call at a time: the summary keeps every adapter's row
    summary = json.loads((adapters / "summary.json").read_text())
    assert {"chat", "orca", "ablate-all-datasets", "ablate-mix-balanced",
            "ablate-mix-ratio"} <= set(summary)
    m_all = json.loads((adapters / "ablate-all-datasets" / "manifest.json").read_text())
    m_chat = json.loads((adapters / "chat" / "manifest.json").read_text())
    m_orca = json.loads((adapters / "orca" / "manifest.json").read_text())
    assert m_all["datasets"] == ["chat", "orca"]  # saw every dataset
    assert m_all["metrics"]["examples"] == m_chat["metrics"]["examples"] + m_orca["metrics"]["examples"]

    # the mixes: the same token budget as the two datasets together, split by their shares
    from fashionfuse.config import load_config

    longest = load_config(pipeline_run["config"]).model.max_input_len
    balanced = json.loads((adapters / "ablate-mix-balanced" / "manifest.json").read_text())["mix"]
    assert {d: r["share"] for d, r in balanced.items()} == {"chat": 0.5, "orca": 0.5}
    targets = [r["target_supervised_tokens"] for r in balanced.values()]
    assert abs(targets[0] - targets[1]) <= 1
    for r in balanced.values():  # each reaches its target, overshooting by under one example
        assert 0 <= r["supervised_tokens"] - r["target_supervised_tokens"] < longest
    # the budget is what the loss trains on: half the concatenation's supervised tokens each
    from fashionfuse.base_model import load_tokenizer
    from fashionfuse.examples import load_records, tokenize_records
    from fashionfuse.rundir import RunLayout
    from fashionfuse.train.mixing import supervised_tokens

    cfg = load_config(pipeline_run["config"])
    tok = load_tokenizer(cfg.model)
    budget = sum(supervised_tokens(e) for d in ("chat", "orca") for e in tokenize_records(
        load_records(RunLayout(run).curated(d) / "train.jsonl"), tok, cfg.model.system_message,
        cfg.model.max_input_len, cfg.model.chat_template))
    for r in balanced.values():
        assert abs(r["target_supervised_tokens"] - budget / 2) <= 1
        assert r["input_tokens"] > r["supervised_tokens"]  # the masked prompts, counted apart
    searched = json.loads((run / "search" / "best.json").read_text())["best_weights"]
    ratio = json.loads((adapters / "ablate-mix-ratio" / "manifest.json").read_text())["mix"]
    total = sum(max(0.0, w) for w in searched.values())
    assert {d: r["share"] for d, r in ratio.items()} == {
        d: round(max(0.0, searched[d]) / total, 6) for d in ("chat", "orca")}

    seq = json.loads((adapters / "ablate-seq-2" / "manifest.json").read_text())
    assert seq["on_top_of"] == ["chat"] and seq["datasets"] == ["orca"]
    chat_w = load_file(adapters / "chat" / "adapter_model.safetensors")
    seq_w = load_file(adapters / "ablate-seq-2" / "adapter_model.safetensors")
    key = next(k for k in chat_w if "lora_A" in k)
    torch.testing.assert_close(seq_w[key][:4], chat_w[key].float())  # started from chat

    ones = json.loads((run / "ablate" / "weights-one" / "search" / "best.json").read_text())
    assert ones["best_weights"] == {"chat": 1.0, "orca": 1.0} and ones["n_trials"] == 1
    uniform = json.loads((run / "ablate" / "uniform" / "search" / "best.json").read_text())
    assert uniform["best_weights"] == {"chat": 0.5, "orca": 0.5}
    learned = json.loads((run / "ablate" / "gradient" / "search" / "best.json").read_text())
    assert learned["method"] == "gradient"

    table = json.loads((run / "ablate" / "table.json").read_text())
    labels = [r["model"] for r in table["rows"]]
    assert labels[5].startswith("one adapter, mix by searched weights (chat ")
    del labels[5]
    assert labels[:12] == ["base", "V0.1 adapter:chat", "V0.1 adapter:orca",
                           "V0.2 one adapter, all datasets",
                           "one adapter, balanced mix (equal tokens)",
                           "V0.4 sequential (chat -> orca)",
                           "V0.5 fusion, weights 1", "fusion, uniform 1/2",
                           "V1 fusion, searched (grid)", "fusion, learned (gradient)",
                           "fusion, layer-wise learned (gradient)",
                           "fusion, layer-wise x grid multiplier"]
    assert labels[12] == "fusion, merge-ready (shared A), searched (grid)"
    del labels[12]
    dense = {"TIES": "density 0.5", "DARE": "density 0.5", "magnitude": "density 0.5",
             "DELLA": "density 0.5, epsilon 0.1", "Breadcrumbs": "density 0.5, gamma 0.01",
             "KnOTS-TIES": "density 0.5", "KnOTS-DARE": "density 0.5"}
    for k, (op, params) in enumerate(dense.items()):  # exact merge, then its SVD export
        exact, svd = labels[12 + 2 * k:14 + 2 * k]
        assert exact == f"fusion, {op} (grid, {params}; exact merge)"
        assert svd.startswith(f"fusion, {op} (grid, {params}; SVD rank ")
    assert labels[-1] == "routing, Arrow (top 2 of 2 adapters per token)"
    assert len(labels) == 12 + 2 * len(dense) + 1
    # merge-ready: both per-dataset adapters trained again on one frozen A, fused at rank r
    ready = [load_file(adapters / f"ablate-merge-ready-{d}" / "adapter_model.safetensors")
             for d in ("chat", "orca")]
    assert all(torch.equal(ready[0][k], ready[1][k]) for k in ready[0] if "lora_A" in k)
    fused_ready = json.loads((run / "ablate" / "merge-ready" / "search" / "fused" /
                              "adapter_config.json").read_text())
    assert fused_ready["r"] == 4
    layer = json.loads((run / "ablate" / "layerwise" / "search" / "best.json").read_text())
    assert layer["granularity"] == "layer" and set(layer["best_weights"]) == {
        f"{n}@{b}" for n in ("chat", "orca") for b in (0, 1)}
    refined = json.loads((run / "ablate" / "layerwise-refined" / "search" / "best.json").read_text())
    assert {k: refined["best_weights"][k] for k in layer["best_weights"]} == layer["best_weights"]
    assert refined["n_trials"] == 9  # multipliers {0.5, 1, 1.5} for each of 2 adapters
    assert refined["best_score"] <= layer["best_score"] + 1e-9  # the learned point is a candidate
    for op in ("ties", "dare", "magnitude", "della", "breadcrumbs", "knots_ties", "knots_dare"):
        best = json.loads((run / "ablate" / op / "search" / "best.json").read_text())
        assert best["operator"] == op and best["n_trials"] == 4
        assert (run / "ablate" / op / "search" / "fused" / "svd_report.json").is_file()
    best = max(table["rows"][1:3], key=lambda r: r["average"])
    assert table["best_single"] == best["model"]
    for r in table["rows"]:
        assert r["vs_best_single"] == round(r["average"] - best["average"], 2)
    md = (run / "ablate" / "table.md").read_text()
    assert "vs best single" in md and (run / "ablate" / "table.png").read_bytes()[:4] == b"\x89PNG"
    # the verdict: the paper's comparisons, each a paired bootstrap over the same items
    verdict = {v["label"]: v for v in table["verdict"]}
    assert {"fused - best single", "fused - all-data", "fused - balanced mix",
            "fused - routing", "merge-ready fused - standard fused",
            "merge-ready fused - all-data", "merge-ready fused - balanced mix",
            "merge-ready fused - best single"} <= set(verdict)
    router = json.loads((run / "ablate" / "arrow" / "router.json").read_text())
    assert [p.rsplit("/", 1)[1] for p in router["adapters"]] == ["chat", "orca"]
    rows = {r["model"]: r for r in table["rows"]}
    for v in table["verdict"]:
        assert v["low"] <= v["difference"] <= v["high"] and v["items"] > 0
        if v["statistic"] == "average":  # the point estimate is the table's own difference
            assert v["difference"] == pytest.approx(rows[v["a"]]["average"]
                                                    - rows[v["b"]]["average"], abs=0.02)
        assert ("cannot be told apart" in v["line"]) == (v["low"] <= 0 <= v["high"])
        if v["statistic"] == "average" or not v["low"] <= 0 <= v["high"]:
            assert v["line"] in md  # the paper's comparisons, and every retention change
    assert md.startswith("**Verdict**")
    results = sorted((run / "ablate" / "eval").glob("*/results.json"))
    assert len(results) == len(labels) + 2  # every variant was really scored by lm-eval
    assert all(json.loads(p.read_text())["results"] for p in results)

    page = (run / "report.html").read_text()  # ablate ends with the run's report
    assert ">Ablation</h2>" in page and "vs best single" in page
    assert page.index(">Verdict</h2>") < page.index(">Summary</h2>")
    from fashionfuse.experiments.verdict import shown_lines

    assert all(html.escape(line) in page for line in shown_lines(table["verdict"]))

    again = runner.invoke(app, args)  # everything up to date: nothing rebuilt
    assert again.exit_code == 0 and "eval: up to date" in again.output


def test_mixed_searched_tries_every_grid_mix_and_keeps_the_best(pipeline_run, tmp_path):
    """`mixed_searched`: one adapter per distinct normalised grid point (grid {0, 1} over two
    datasets: chat only, orca only, half and half), each scored alone by the search objective;
    the lowest score is the table's row."""
    import shutil

    from fashionfuse.config import load_config
    from fashionfuse.search.objectives import build_objective

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("eval*"))
    args = ["ablate", str(pipeline_run["config"]), "--set", f"run_dir={run}",
            "--set", "ablate.variants=[mixed_searched]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    trials = json.loads((run / "ablate" / "mix-search" / "trials.json").read_text())
    assert [t["mix"] for t in trials] == [{"chat": 0.0, "orca": 1.0}, {"chat": 1.0, "orca": 0.0},
                                          {"chat": 0.5, "orca": 0.5}]
    for t in trials:  # each candidate trained on its own mix
        manifest = json.loads((run / "adapters" / t["adapter"] / "manifest.json").read_text())
        assert {d: r["share"] for d, r in manifest["mix"].items()} == t["mix"]
    best = json.loads((run / "ablate" / "mix-search" / "best.json").read_text())
    assert best["score"] == min(t["score"] for t in trials) and best["n_candidates"] == 3

    # the winner's score is the objective's own on base + that adapter
    from fashionfuse.adapters.runtime import attach_adapters, set_fusion_weights
    from fashionfuse.base_model import load_base_model, load_tokenizer

    cfg = load_config(pipeline_run["config"], [f"run_dir={run}"])
    model = attach_adapters(load_base_model(cfg.model, device="cpu"),
                            {best["adapter"]: run / "adapters" / best["adapter"]})
    set_fusion_weights(model, {best["adapter"]: 1.0})
    again = build_objective(cfg, load_tokenizer(cfg.model), "cpu").score(model)["score"]
    assert abs(again - best["score"]) < 1e-4

    table = json.loads((run / "ablate" / "table.json").read_text())
    shares = ", ".join(f"{d} {v:.2f}" for d, v in best["mix"].items())
    assert [r["model"] for r in table["rows"]] == ["base", f"one adapter, mix searched ({shares})"]


def test_mixed_searched_with_a_sampler_uses_its_budget_and_resumes(pipeline_run, tmp_path):
    """`mixed_searched` under `search.method: tpe`: the sampler's `n_trials` proposals, each
    distinct mix trained once and named by its shares; the study is kept, so running again
    retrains nothing and finds the same best."""
    import shutil

    import optuna
    from optuna.storages.journal import JournalFileBackend

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("eval*"))
    args = ["ablate", str(pipeline_run["config"]), "--set", f"run_dir={run}",
            "--set", "ablate.variants=[mixed_searched]", "--set", "search.method=tpe",
            "--set", "search.n_trials=3", "--set", "search.step=0.5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    folder = run / "ablate" / "mix-search"
    trials = json.loads((folder / "trials.json").read_text())
    best = json.loads((folder / "best.json").read_text())
    assert best["method"] == "tpe" and best["n_trials"] == 3
    assert 1 <= len(trials) <= 3 and len({t["adapter"] for t in trials}) == len(trials)
    for t in trials:  # each a mix of the lattice {0, .5, 1}^2, trained on its own shares
        assert abs(sum(t["mix"].values()) - 1) < 1e-6
        manifest = json.loads((run / "adapters" / t["adapter"] / "manifest.json").read_text())
        assert {d: r["share"] for d, r in manifest["mix"].items()} == t["mix"]
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    scored = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(scored) + sum(bool(t.user_attrs.get("no_mix")) for t in study.trials) == 3
    assert best["score"] == min(t.value for t in scored)

    again = runner.invoke(app, args)
    assert again.exit_code == 0, (again.output, again.exception)
    trained = [line for line in again.output.splitlines()
               if line.startswith("train ablate-mix-search-")]
    assert trained and all(line.endswith(": up to date") for line in trained)
    assert json.loads((folder / "best.json").read_text()) == best
    assert len(optuna.load_study(study_name=summary.study_name, storage=storage).trials) == \
        len(study.trials)


def test_mixed_searched_refuses_a_method_that_cannot_draw_mixes(pipeline_run, tmp_path):
    result = runner.invoke(app, ["ablate", str(pipeline_run["config"]), "--set",
                                 f"run_dir={tmp_path / 'run'}", "--set",
                                 "ablate.variants=[mixed_searched]", "--set",
                                 "search.method=gradient"])
    assert result.exit_code != 0
    assert "mixed_searched (search.method gradient" in result.output


def test_mix_search_interrupted_while_training_runs_that_mix_again(pipeline_run, tmp_path):
    """A sampled mix search stopped while a proposal trains resumes with that same mix (its
    adapter resumes from its checkpoint), then proposes the rest of the budget."""
    import pytest

    from fashionfuse.config import load_config
    from fashionfuse.experiments.mix_search import _sampled

    cfg = load_config(pipeline_run["config"], [f"run_dir={tmp_path / 'run'}", "search.method=tpe",
                                               "search.n_trials=4", "search.step=0.25"])

    class Scorer:  # stands in for train-and-score
        def __init__(self, stop_at: int | None = None):
            self.seen, self.stop_at = [], stop_at

        def score(self, shares):
            self.seen.append(shares)
            if len(self.seen) == self.stop_at:
                raise KeyboardInterrupt("stopped while training (test)")
            return {"score": sum(v * v for v in shares.values())}

    first = Scorer(stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        _sampled(cfg, first, force=False)
    second = Scorer()
    assert _sampled(cfg, second, force=False) == 4
    # the finished trial's record, then the interrupted mix again, then new proposals
    assert second.seen[:2] == first.seen[:2] and len(second.seen) >= 4


def test_ablate_seeds_trains_each_seed_and_widens_the_verdict(pipeline_run, tmp_path):
    """`ablate.seeds`: the run's own training seed reuses the run, another seed trains every
    variant again on the same curated splits (different adapters), the table is the mean with
    each summary column's spread beside it, and the verdict pools both seeds' items."""
    import shutil

    from safetensors.torch import load_file as load

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("eval*"))
    args = ["ablate", str(pipeline_run["config"]), "--set", f"run_dir={run}",
            "--set", "ablate.variants=[per_dataset,fused_dataset,searched]",
            "--set", "ablate.seeds=[7,11]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "train chat: up to date" in result.output  # seed 7 is the run's own
    other = run / "ablate" / "seed-11"
    assert (other / "curate").resolve() == (run / "curate").resolve()  # same splits and items
    mine = load(str(run / "adapters" / "chat" / "adapter_model.safetensors"))
    theirs = load(str(other / "adapters" / "chat" / "adapter_model.safetensors"))
    assert any(not torch.equal(mine[k], theirs[k]) for k in mine)
    assert json.loads((other / "adapters" / "chat" / "manifest.json").read_text())["seed"] == 11

    table = json.loads((run / "ablate" / "table.json").read_text())
    assert table["seeds"] == [7, 11] and len(table["per_seed"]) == 2
    for k, row in enumerate(table["rows"]):
        pair = [t["rows"][k]["average"] for t in table["per_seed"]]
        assert row["average"] == pytest.approx(sum(pair) / 2, abs=0.01)
        assert row["average sd"] == pytest.approx(abs(pair[0] - pair[1]) / 2 ** 0.5, abs=0.01)
    verdict = {v["label"]: v for v in table["verdict"]}
    assert verdict["fused - all-data"]["seeds"] == 2 and "2 seeds" in verdict["fused - all-data"][
        "line"]
    md = (run / "ablate" / "table.md").read_text()
    assert "average sd" in md and md.startswith("**Verdict**")
    shown = runner.invoke(app, ["report", str(run)])  # the verdict on the console too
    assert shown.exit_code == 0 and "verdict: fused - all-data:" in shown.output


def test_arrow_router_scores_like_peft_built_by_hand(pipeline_run, tmp_path):
    """The router the eval scores is PEFT's `create_arrow_model` over the trained adapters:
    its logits equal a hand-built Arrow model's, and differ from the base's and from each
    adapter alone."""
    from peft import ArrowConfig, PeftModel, create_arrow_model

    from fashionfuse.adapters.routing import build_router, is_router, write_router
    from fashionfuse.base_model import load_base_model
    from fashionfuse.config import load_config

    cfg = load_config(pipeline_run["config"])
    adapters = [pipeline_run["run_dir"] / "adapters" / n for n in ("chat", "orca")]
    router = write_router(tmp_path / "arrow", adapters, top_k=5, temperature=1.0, seed=0)
    assert is_router(router) and not is_router(adapters[0])
    assert json.loads((router / "router.json").read_text())["top_k"] == 2  # capped
    ids = torch.tensor([[1, 17, 40, 99, 7, 23, 5, 61]])
    ours = build_router(load_base_model(cfg.model, device="cpu"), router)
    theirs = create_arrow_model(load_base_model(cfg.model, device="cpu"),
                                [str(p) for p in adapters],
                                ArrowConfig(top_k=2, router_temperature=1.0, rng_seed=0)).eval()
    single = PeftModel.from_pretrained(load_base_model(cfg.model, device="cpu"),
                                       str(adapters[0])).eval()
    with torch.no_grad():
        routed = ours(input_ids=ids).logits
        assert torch.equal(routed, theirs(input_ids=ids).logits)
        with ours.disable_adapter():
            assert not torch.equal(routed, ours(input_ids=ids).logits)
        assert not torch.equal(routed, single(input_ids=ids).logits)
