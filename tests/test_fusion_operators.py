"""Fusion beyond one weight per adapter: merge operators against reference implementations
written here from their papers, layer-wise weights, resident dense application, SVD export."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fashionfuse.fusion import dare, magnitude, ties
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


def _reference_ties(deltas, weights, density):
    """TIES-merging (Yadav et al. 2023, Alg. 1) entry by entry: trim, elect, disjoint mean."""
    trimmed = [_reference_trim(w * d, density) for w, d in zip(weights, deltas)]
    out = torch.zeros_like(deltas[0])
    for idx in range(out.numel()):
        values = [float(t.flatten()[idx]) for t in trimmed]
        total = sum(values)
        sign = (total > 0) - (total < 0)
        agreeing = [v for v in values if v != 0 and ((v > 0) - (v < 0)) == sign]
        out.view(-1)[idx] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


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
@pytest.mark.parametrize("op", ["ties", "dare", "magnitude"])
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
