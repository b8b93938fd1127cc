"""Fusion beyond one weight per adapter: merge operators against reference implementations
written here from their papers, layer-wise weights, resident dense application, SVD export."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fashionfuse.fusion import breadcrumbs, dare, della, knots, magnitude, ties
from fashionfuse.fusion.export import merged_deltas, write_fused
from fashionfuse.adapters.weight_keys import module_weights, weight_names
from fashionfuse.fusion.resident import ResidentFusion
from fashionfuse.adapters.runtime import attach_adapters, set_fusion_weights
from fashionfuse.adapters.saved import fuse_adapters, load_saved_adapter

from .test_fusion import _independent_delta, _make_adapter


def _random_deltas(n=3, shape=(16, 24), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]


# --------------------------------------------------------------------------- operators
def _reference_trim(t, density):
    """Keep the k = round(density * numel) largest |t| entries (by index, via topk)."""
    k = max(1, round(density * t.numel()))
    keep = torch.zeros(t.numel(), dtype=torch.bool)
    keep[torch.topk(t.abs().flatten(), k).indices] = True
    return torch.where(keep.view_as(t), t, torch.zeros_like(t))


def _reference_disjoint_mean(taus):
    """TIES' elect + disjoint mean entry by entry (Yadav et al. 2023, Alg. 1 steps 2-3)."""
    out = torch.zeros_like(taus[0])
    for idx in range(out.numel()):
        values = [float(t.flatten()[idx]) for t in taus]
        total = sum(values)
        sign = (total > 0) - (total < 0)
        agreeing = [v for v in values if v != 0 and ((v > 0) - (v < 0)) == sign]
        out.view(-1)[idx] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


def _reference_ties(deltas, weights, density):
    """TIES-merging (Yadav et al. 2023, Alg. 1) entry by entry: trim, elect, disjoint mean."""
    return _reference_disjoint_mean([_reference_trim(w * d, density)
                                     for w, d in zip(weights, deltas)])


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_reference(density):
    deltas, weights = _random_deltas(), [0.7, 1.0, 1.3]
    got = ties.merge(deltas, weights, density=density)
    torch.testing.assert_close(got, _reference_ties(deltas, weights, density), rtol=0, atol=1e-12)


def test_magnitude_matches_reference():
    deltas, weights = _random_deltas(seed=1), [0.5, -1.0, 2.0]
    want = sum(w * _reference_trim(d, 0.3) for w, d in zip(weights, deltas))
    got = magnitude.merge(deltas, weights, density=0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert int((magnitude.trim(deltas[0], 0.3) != 0).sum()) == round(0.3 * deltas[0].numel())


def test_dare_is_drop_and_rescale():
    """DARE (Yu et al. 2023): each entry kept with probability p and rescaled by 1/p, dropped
    otherwise; seeded masks; the merge is the weighted sum of the rescaled deltas."""
    deltas, weights, keep = _random_deltas(shape=(64, 80), seed=2), [0.6, 1.0, 1.4], 0.3
    singles = [dare.merge([d], [1.0], density=keep, seeds=[100 + i]) for i, d in enumerate(deltas)]
    for d, s in zip(deltas, singles):
        kept = s != 0
        torch.testing.assert_close(s[kept], d[kept] / keep, rtol=0, atol=1e-12)
        share = kept.double().mean().item()
        sigma = (keep * (1 - keep) / d.numel()) ** 0.5
        assert abs(share - keep) < 4 * sigma
    merged = dare.merge(deltas, weights, density=keep, seeds=[100, 101, 102])
    torch.testing.assert_close(merged, sum(w * s for w, s in zip(weights, singles)),
                               rtol=0, atol=1e-12)
    assert torch.equal(merged, dare.merge(deltas, weights, density=keep, seeds=[100, 101, 102]))
    assert not torch.equal(singles[0], dare.merge([deltas[0]], [1.0], density=keep, seeds=[7]))
    # unbiased: the mean over many masks approaches the delta
    mean = sum(dare.merge([deltas[0]], [1.0], density=keep, seeds=[s]) for s in range(300)) / 300
    assert (mean - deltas[0]).abs().mean() < 0.15 * deltas[0].abs().mean()


def test_della_keep_probabilities_follow_the_magnitude_rank_in_each_row():
    """DELLA's MAGPRUNE (Deep et al. 2024): within a row the keep probability rises linearly
    with the magnitude rank from density - epsilon to density + epsilon."""
    delta = _random_deltas(n=1, shape=(5, 9), seed=3)[0]
    density, eps = 0.4, 0.15
    got = della.keep_probabilities(delta, density, eps)
    for r in range(delta.shape[0]):
        order = sorted(range(delta.shape[1]), key=lambda j: abs(float(delta[r, j])))
        for rank, j in enumerate(order):
            want = density - eps + 2 * eps * rank / (delta.shape[1] - 1)
            assert float(got[r, j]) == pytest.approx(want, abs=1e-12)
        assert float(got[r].mean()) == pytest.approx(density, abs=1e-12)


def test_della_magprune_rescales_kept_entries_and_is_unbiased():
    delta = _random_deltas(n=1, shape=(32, 40), seed=4)[0]
    density, eps = 0.5, 0.2
    keep = della.keep_probabilities(delta, density, eps)
    pruned = della.magprune(delta, density, eps, seed=9)
    kept = pruned != 0
    torch.testing.assert_close(pruned[kept], (delta / keep)[kept], rtol=0, atol=1e-12)
    assert torch.equal(pruned, della.magprune(delta, density, eps, seed=9))
    # the largest entries of each row are kept more often than the smallest
    draws = torch.stack([della.magprune(delta, density, eps, seed=s) != 0 for s in range(400)])
    share = draws.double().mean(0)
    top, bottom = keep > density + 0.1, keep < density - 0.1
    assert share[top].mean() > share[bottom].mean() + 0.2
    assert (share - keep).abs().max() < 5 * (0.25 / 400) ** 0.5
    mean = sum(della.magprune(delta, density, eps, seed=s) for s in range(400)) / 400
    assert (mean - delta).abs().mean() < 0.15 * delta.abs().mean()


def test_della_merge_is_elect_and_disjoint_mean_of_the_pruned_deltas():
    deltas, weights, seeds = _random_deltas(shape=(6, 7), seed=5), [0.7, 1.0, 1.3], [1, 2, 3]
    got = della.merge(deltas, weights, density=0.6, epsilon=0.1, seeds=seeds)
    pruned = [della.magprune(w * d, 0.6, 0.1, s) for w, d, s in zip(weights, deltas, seeds)]
    torch.testing.assert_close(got, _reference_disjoint_mean(pruned), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="epsilon"):
        della.merge(deltas, weights, density=0.6, epsilon=0.5, seeds=seeds)


def test_breadcrumbs_drops_both_tails():
    """Model Breadcrumbs (Davari & Belilovsky 2023): per layer the largest gamma share of
    entries (outliers) and the smallest are masked, a density share kept; then the weighted
    sum."""
    deltas, weights = _random_deltas(shape=(10, 12), seed=6), [0.5, 1.0, -0.8]
    density, gamma = 0.6, 0.1
    want = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas):
        n = d.numel()
        ranked = sorted(range(n), key=lambda i: abs(float(d.flatten()[i])))  # ascending
        top, keep = round(gamma * n), round(density * n)
        masked = torch.zeros(n, dtype=d.dtype)
        for i in ranked[n - top - keep:n - top]:
            masked[i] = d.flatten()[i]
        want += w * masked.view_as(d)
    got = breadcrumbs.merge(deltas, weights, density=density, gamma=gamma)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    single = breadcrumbs.crumbs(deltas[0], density, gamma)
    assert int((single != 0).sum()) == round(density * 120)
    assert float(single.abs().max()) < float(deltas[0].abs().max())  # the outliers are gone
    with pytest.raises(ValueError, match="at most 1"):
        breadcrumbs.crumbs(deltas[0], 0.95, 0.1)


def test_knots_aligns_the_deltas_in_one_basis_then_merges_there():
    """KnOTS (Stoica et al. 2024): the SVD of [dW_1 ... dW_n] = U S [V_1^T ... V_n^T] writes
    every dW_i = U S V_i^T in one basis; TIES (or DARE-TIES) merges the V_i^T; the result is
    U S V_merged^T."""
    gen = torch.Generator().manual_seed(7)
    # LoRA-like deltas: rank 2 and 3 updates of a 12 x 10 layer
    deltas = [torch.randn(12, r, generator=gen, dtype=torch.float64)
              @ torch.randn(r, 10, generator=gen, dtype=torch.float64) for r in (2, 3)]
    weights = [0.9, 1.2]
    us, blocks = knots.shared_basis(deltas)
    assert us.shape == (12, 5)  # the rank of the concatenation: 2 + 3
    for d, v in zip(deltas, blocks):
        torch.testing.assert_close(us @ v, d, rtol=0, atol=1e-10)
    u, s, vt = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    ref_blocks = [vt[:5, :10].contiguous(), vt[:5, 10:].contiguous()]
    want = (u[:, :5] * s[:5]) @ _reference_ties(ref_blocks, weights, 0.5)
    torch.testing.assert_close(knots.merge_ties(deltas, weights, density=0.5), want,
                               rtol=0, atol=1e-10)
    dense_ties = knots.merge_ties(deltas, weights, density=1.0)
    torch.testing.assert_close(knots.merge_dare(deltas, weights, density=1.0, seeds=[1, 2]),
                               dense_ties, rtol=0, atol=1e-12)
    dropped = knots.merge_dare(deltas, weights, density=0.5, seeds=[1, 2])
    assert torch.equal(dropped, knots.merge_dare(deltas, weights, density=0.5, seeds=[1, 2]))
    assert not torch.equal(dropped, knots.merge_dare(deltas, weights, density=0.5, seeds=[3, 2]))


# --------------------------------------------------------------------------- layer weights
@pytest.fixture(scope="module")
def three_adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("op-adapters")
    return [_make_adapter(tiny_model, root / n, r=r, alpha=a, seed=s)
            for n, r, a, s in (("a", 2, 4, 11), ("b", 4, 4, 12), ("c", 3, 9, 13))]


def _block(module_key):
    return int(re.search(r"\.layers\.(\d+)\.", module_key).group(1))


def test_equal_layer_weights_reproduce_adapter_fusion(tiny_model, three_adapters):
    names, per_adapter = ["a", "b", "c"], {"a": 0.4, "b": 1.1, "c": -0.2}
    saved = [load_saved_adapter(d) for d in three_adapters]
    modules = sorted(saved[0].modules)
    layer = {k: per_adapter[k.split("@")[0]] for k in weight_names(names, modules, "layer")}
    _, want = fuse_adapters(saved, [per_adapter[n] for n in names])
    _, got = fuse_adapters(saved, module_weights(layer, names, modules, "layer"))
    assert all(torch.equal(got[k], want[k]) for k in want)

    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64),
                            dict(zip(names, three_adapters)))
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        set_fusion_weights(model, per_adapter)
        by_adapter = model(ids).logits
        set_fusion_weights(model, layer, names, "layer")
        assert torch.equal(model(ids).logits, by_adapter)


def test_layer_wise_export_is_the_per_layer_weighted_sum(three_adapters, tmp_path):
    names = ["a", "b", "c"]
    saved = [load_saved_adapter(d) for d in three_adapters]
    keys = weight_names(names, sorted(saved[0].modules), "layer")
    weights = {k: 0.3 + 0.2 * i for i, k in enumerate(keys)} | {"b": 1.5}  # b: a multiplier
    report, _ = write_fused(tmp_path / "fused", saved, names, weights, granularity="layer")
    assert report["exact"]
    got = _independent_delta([tmp_path / "fused"], [1.0])
    want = {}
    for name, d in zip(names, three_adapters):
        for mod, delta in _independent_delta([d], [1.0]).items():
            w = weights[f"{name}@{_block(mod)}"] * (1.5 if name == "b" else 1.0)
            want[mod] = want.get(mod, 0) + w * delta
    assert set(got) == set(want)
    for mod in want:
        torch.testing.assert_close(got[mod], want[mod], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- dense operators
@pytest.mark.parametrize("op", ["ties", "dare", "magnitude", "della", "breadcrumbs",
                                "knots_ties", "knots_dare"])
def test_resident_dense_operator_equals_merged_weights(tiny_model, three_adapters, op):
    """The resident search model (LoRA paths off, hooks adding the merged delta) computes what
    the base with W + dW (dW merged from the saved files in float64) computes."""
    names, weights = ["a", "b", "c"], {"a": 0.8, "b": 0.5, "c": 1.2}
    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                            dict(zip(names, three_adapters)))
    fusion = ResidentFusion(model, names, operator_name=op, density=0.4, seed=5)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 11]])
    deltas = merged_deltas([load_saved_adapter(d) for d in three_adapters], names, weights,
                           granularity="adapter", operator_name=op, density=0.4, seed=5)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    with torch.no_grad():
        for mod, d in deltas.items():
            dense.get_submodule(mod.removeprefix("base_model.model.")).weight += d
        fusion.apply(weights)
        got = model(ids).logits.double()
        torch.testing.assert_close(got, dense(ids).logits, rtol=1e-4, atol=1e-4)
        fusion.apply({"a": 1.0, "b": 0.0, "c": 0.0})  # another candidate, in place
        assert not torch.allclose(model(ids).logits.double(), got)
        fusion.close()
        set_fusion_weights(model, {n: 0.0 for n in names})
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)(ids).logits
        torch.testing.assert_close(model(ids).logits, base)


def test_svd_export_reports_the_measured_error(three_adapters, tmp_path):
    names, weights = ["a", "b", "c"], {"a": 1.0, "b": 0.7, "c": 0.9}
    saved = [load_saved_adapter(d) for d in three_adapters]
    report, deltas = write_fused(tmp_path / "fused", saved, names, weights, operator_name="ties",
                                 density=0.3, seed=1, svd_rank=4)
    assert json.loads((tmp_path / "fused" / "svd_report.json").read_text()) == report
    tensors = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    cfg = json.loads((tmp_path / "fused" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4
    lost = total = 0.0
    for mod, d in deltas.items():
        ref = _reference_ties_fast([_independent_delta([p], [1.0])[mod] for p in three_adapters],
                                   [weights[n] for n in names], 0.3)
        torch.testing.assert_close(d, ref, rtol=0, atol=1e-12)
        approx = tensors[f"{mod}.lora_B.weight"].double() @ tensors[f"{mod}.lora_A.weight"].double()
        err = float((approx - d).norm())
        assert err / float(d.norm()) == pytest.approx(report["per_module"][mod], rel=1e-3, abs=1e-6)
        lost, total = lost + err ** 2, total + float(d.norm()) ** 2
    assert (lost / total) ** 0.5 == pytest.approx(report["relative_error"], rel=1e-3)
    assert 0 < report["relative_error"] < 1


def _reference_ties_fast(deltas, weights, density):
    """The same TIES definition vectorised (the entry-by-entry version is slow on real shapes)."""
    trimmed = torch.stack([_reference_trim(w * d, density) for w, d in zip(weights, deltas)])
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


# --------------------------------------------------------------------------- through the CLI
def test_layer_wise_learning_then_refined_dense_search_through_the_cli(pipeline_run, tmp_path):
    """search-weights learns per-block weights (gradient, smoothness), exports them exactly;
    a second search refines them with per-adapter multipliers and a searched TIES density,
    exported by SVD with its error."""
    import shutil

    from typer.testing import CliRunner

    from fashionfuse.cli import app

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("search*", "eval*"))
    base = ["--set", f"run_dir={run}", "--set", "search.method=gradient",
            "--set", "search.granularity=layer", "--set", "search.smoothness=0.01",
            "--set", "search.gradient_steps=4", "--set", "search.gradient_lr=0.2",
            "--set", "search.high=2.0"]
    result = CliRunner().invoke(app, ["search-weights", str(pipeline_run["config"]), *base])
    assert result.exit_code == 0, result.output
    best = json.loads((run / "search" / "best.json").read_text())
    assert best["granularity"] == "layer"
    names = best["adapters"]
    saved_dirs = [run / "adapters" / n for n in names]
    blocks = {_block(m) for m in load_saved_adapter(saved_dirs[0]).modules}
    assert set(best["best_weights"]) == {f"{n}@{b}" for n in names for b in blocks}
    start, learned = json.loads((run / "search" / "trials.json").read_text())
    assert learned["score"] < start["score"]
    got = _independent_delta([run / "search" / "fused"], [1.0])
    for mod, _ in got.items():
        want = sum(best["best_weights"][f"{n}@{_block(mod)}"] * _independent_delta([d], [1.0])[mod]
                   for n, d in zip(names, saved_dirs))
        torch.testing.assert_close(got[mod], want, rtol=1e-5, atol=1e-7)

    shutil.copy(run / "search" / "best.json", tmp_path / "layer-best.json")
    refine = ["--set", f"run_dir={run}", "--set", "search.method=grid",
              "--set", "search.granularity=layer", "--set", "search.operator=ties",
              "--set", f"search.layer_weights_from={tmp_path / 'layer-best.json'}",
              "--set", "search.grid_values=[0.5,1.0]", "--set", "search.density=[0.3,0.7]",
              "--set", "search.svd_rank=4", "--force"]
    result = CliRunner().invoke(app, ["search-weights", str(pipeline_run["config"]), *refine])
    assert result.exit_code == 0, result.output
    trials = json.loads((run / "search" / "trials.json").read_text())
    assert len(trials) == 2 ** len(names) * 2
    assert {t["density"] for t in trials} == {0.3, 0.7}
    assert all(t["merge_seconds"] is not None for t in trials)
    refined = json.loads((run / "search" / "best.json").read_text())
    layer = {k: v for k, v in best["best_weights"].items()}
    assert {k: refined["best_weights"][k] for k in layer} == layer  # learned weights kept
    report = json.loads((run / "search" / "fused" / "svd_report.json").read_text())
    assert report["operator"] == "ties" and report["rank"] == 4
    assert report["density"] == refined["best_density"]


def test_della_with_a_searched_epsilon_through_the_cli(pipeline_run, tmp_path):
    """An operator hyper-parameter beside density (DELLA's epsilon) given as a list is searched
    like density: a grid dimension, a trials column, best.json and the SVD report."""
    import shutil

    from typer.testing import CliRunner

    from fashionfuse.cli import app

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("search*", "eval*"))
    args = ["--set", f"run_dir={run}", "--set", "search.method=grid",
            "--set", "search.operator=della", "--set", "search.grid_values=[0.5,1.0]",
            "--set", "search.density=0.5", "--set", "search.operator_params={epsilon: [0.05, 0.3]}"]
    result = CliRunner().invoke(app, ["search-weights", str(pipeline_run["config"]), *args])
    assert result.exit_code == 0, result.output
    best = json.loads((run / "search" / "best.json").read_text())
    trials = json.loads((run / "search" / "trials.json").read_text())
    assert len(trials) == 2 ** len(best["adapters"]) * 2
    assert {t["epsilon"] for t in trials} == {0.05, 0.3} and {t["density"] for t in trials} == {0.5}
    assert set(trials[0]["weights"]) == set(best["adapters"])  # no hyper-parameter as a weight
    assert len({t["score"] for t in trials if t["weights"] == trials[0]["weights"]}) == 2
    header = (run / "search" / "trials.csv").read_text().splitlines()[0]
    assert header.split(",")[-4:] == ["density", "epsilon", "score", "seconds"]
    report = json.loads((run / "search" / "fused" / "svd_report.json").read_text())
    assert report["operator"] == "della" and report["epsilon"] == best["best_epsilon"]
    bad = CliRunner().invoke(app, ["search-weights", str(pipeline_run["config"]), *args,
                                   "--set", "search.operator_params={gamma: 0.1}"])
    assert bad.exit_code == 2 and "della has no parameter 'gamma'" in bad.output

    # scored exactly as searched: fusion=best.json puts the merged deltas on the base (what
    # lm-eval's CLI gets with --model fashionfuse --model_args ...,fusion=best.json)
    from fashionfuse.evaluate.lm_eval_model import attach_searched_fusion

    names = best["adapters"]
    deltas = merged_deltas([load_saved_adapter(run / "adapters" / n) for n in names], names,
                           best["best_weights"], granularity="adapter", operator_name="della",
                           density=best["best_density"], seed=best["seed"],
                           params={"epsilon": best["best_epsilon"]})
    model = pipeline_run["model"]
    exact = attach_searched_fusion(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                                   run / "search" / "best.json")
    dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 11]])
    with torch.no_grad():
        for mod, d in deltas.items():
            dense.get_submodule(mod.removeprefix("base_model.model.")).weight += d
        torch.testing.assert_close(exact(ids).logits.double(), dense(ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_knots_basis_is_computed_once_per_layer(tiny_model, three_adapters, monkeypatch):
    """KnOTS' SVD does not depend on the weights: the resident search computes it once per
    layer, not once per layer per candidate, and the candidates' merges are unchanged."""
    from fashionfuse.fusion import knots

    names = ["a", "b", "c"]
    model = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                            dict(zip(names, three_adapters)))
    calls = []
    basis = knots.shared_basis
    monkeypatch.setattr(knots, "shared_basis", lambda d: calls.append(1) or basis(d))
    fusion = ResidentFusion(model, names, operator_name="knots_ties", density=0.4, seed=5)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 11]])
    candidates = [{"a": 0.8, "b": 0.5, "c": 1.2}, {"a": 0.1, "b": 1.0, "c": 0.3}]
    with torch.no_grad():
        got = []
        for weights in candidates:
            fusion.apply(weights)
            got.append(model(ids).logits)
        assert len(calls) == len(fusion.layers)
        fusion.close()
        fresh = ResidentFusion(model, names, operator_name="knots_ties", density=0.4, seed=5)
        fresh.apply(candidates[1])
        torch.testing.assert_close(model(ids).logits, got[1])
        fresh.close()


def test_masks_are_hashes_of_seed_and_position_computed_where_the_delta_lives(monkeypatch):
    """DARE's and DELLA's draws are splitmix64 hashes of (seed, position), exact integer
    arithmetic that gives the same numbers on any device (checked against a uint64 reference
    in plain Python), computed on the delta's device: no host generator, nothing copied over
    for each candidate."""
    from fashionfuse.fusion import dare
    from fashionfuse.fusion.seeded_uniform import uniform

    def reference(i, seed):
        full = (1 << 64) - 1
        z = (i * 0x9E3779B97F4A7C15 + ((seed * 0x2545F491) & 0x7FFFFFFFFFFFFFFF)) & full
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & full
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & full
        return ((z ^ (z >> 31)) >> 11) / (1 << 53)

    draws = uniform((40, 25), seed=123456789)
    flat = draws.flatten().tolist()
    assert all(flat[i] == reference(i, 123456789) for i in range(0, 1000, 37))
    assert 0.45 < float((draws < 0.5).float().mean()) < 0.55

    def no_host_rng(*args, **kwargs):
        raise AssertionError("a host-side random draw")

    monkeypatch.setattr(torch, "rand", no_host_rng)
    monkeypatch.setattr(torch, "Generator", no_host_rng)
    mask = dare.drop_mask((40, 25), 0.3, 5, device="cpu")
    assert mask.dtype == torch.bool and torch.equal(mask, uniform((40, 25), 5) < 0.3)
    delta = torch.ones(40, 25)
    assert torch.equal(della.magprune(delta, 0.5, 0.1, 3), della.magprune(delta, 0.5, 0.1, 3))
