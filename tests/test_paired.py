"""Paired bootstrap comparisons: known answers (identical rows, a planted difference), the
table's own way of forming columns, groups and the average, and the verdict's wording."""

from __future__ import annotations

import numpy as np
import pytest

from fashionfuse.evaluate.paired import item_values, paired_difference, verdict_line
from fashionfuse.evaluate.presets import TaskSpec

SPECS = [TaskSpec("t1", 0, "acc,none", "c1"), TaskSpec("t2", 0, "acc,none", "c2"),
         TaskSpec("t3", 0, "acc,none", "c2")]


def _items(values: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {t: {str(i): float(x) for i, x in enumerate(v)} for t, v in values.items()}


def test_identical_rows_differ_by_zero_with_a_zero_width_interval():
    rng = np.random.default_rng(0)
    items = _items({t: rng.integers(0, 2, 50) for t in ("t1", "t2", "t3")})
    result = paired_difference(items, items, SPECS)
    assert result == {"difference": 0.0, "low": 0.0, "high": 0.0, "items": 150, "seeds": 1,
                      "draws": 4000}
    assert verdict_line("a - b", result).endswith("cannot be told apart")


def test_a_planted_difference_is_recovered():
    """Model a = b + 0.1 (+ noise of mean 0) on t1 only: column c1 is 10 points up, the average
    of the two columns 5; the interval holds 5 and not 0, and is as wide as the noise says."""
    rng = np.random.default_rng(1)
    b = {t: rng.random(400) for t in ("t1", "t2", "t3")}
    a = dict(b, t1=b["t1"] + 0.1 + rng.normal(0, 0.05, 400))
    result = paired_difference(_items(a), _items(b), SPECS, seed=3)
    assert result["difference"] == pytest.approx(5 + 100 * (a["t1"] - b["t1"] - 0.1).mean() / 2)
    assert result["low"] < 5 < result["high"] and result["low"] > 0
    half_width = (result["high"] - result["low"]) / 2
    assert half_width == pytest.approx(1.96 * 5 / 400 ** 0.5 / 2, rel=0.15)  # sd 5 points / 2
    column = paired_difference(_items(a), _items(b), SPECS, "c1", seed=3)
    assert column["difference"] == pytest.approx(2 * result["difference"])
    assert paired_difference(_items(a), _items(b), SPECS, seed=3) == result  # seeded
    assert "cannot" not in verdict_line("a - b", result)


def test_groups_and_only_common_items():
    """With groups the average is the mean of the group means; items one model lacks are left
    out of both."""
    specs = [TaskSpec("t1", 0, "acc,none", "c1", group="skill"),
             TaskSpec("t2", 0, "acc,none", "c2", group="skill"),
             TaskSpec("t3", 0, "acc,none", "c3", group="retention")]
    a = _items({"t1": np.ones(10), "t2": np.zeros(10), "t3": np.ones(10)})
    b = _items({"t1": np.zeros(10), "t2": np.zeros(10), "t3": np.zeros(8)})
    result = paired_difference(a, b, specs)
    assert result["difference"] == pytest.approx((50 + 100) / 2) and result["items"] == 28
    assert paired_difference(a, b, specs, "retention")["difference"] == pytest.approx(100)
    with pytest.raises(KeyError):
        paired_difference(a, b, specs, "nowhere")


def test_item_values_from_lm_eval_samples():
    results = {"results": {"t1": {"acc,none": 0.5}},
               "samples": {"t1": [{"doc_id": 0, "filter": "none", "acc": 1.0},
                                  {"doc_id": 1, "filter": "none", "acc": 0.0},
                                  {"doc_id": 1, "filter": "other", "acc": 1.0}]}}
    assert item_values(results, SPECS[:1]) == {"t1": {"0": 1.0, "1": 0.0}}


def test_seeds_widen_the_interval_by_their_spread():
    """Three training seeds: the difference is the mean of the seeds' differences, and the
    interval holds the seed-to-seed spread that one seed's interval cannot show."""
    rng = np.random.default_rng(2)
    b = {t: rng.random(300) for t in ("t1", "t2", "t3")}
    shifts = (0.02, 0.10, 0.18)  # the gain differs by seed: 1, 5 and 9 points on the average
    runs_a = [_items(dict(b, t1=b["t1"] + s)) for s in shifts]
    runs_b = [_items(b)] * 3
    result = paired_difference(runs_a, runs_b, SPECS, seed=0)
    assert result["seeds"] == 3 and result["difference"] == pytest.approx(5.0)
    one = paired_difference(runs_a[1], runs_b[1], SPECS, seed=0)
    assert one["high"] - one["low"] < 1e-9  # one seed, a constant shift: no item variation
    assert result["low"] <= 1.0 + 1e-9 and result["high"] >= 9.0 - 1e-9  # the seeds' range
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference(runs_a, runs_b[:2], SPECS)


def test_the_verdict_shows_every_comparison_and_only_retention_changes():
    from fashionfuse.experiments.verdict import shown_lines

    def line(label, statistic, low, high):
        return {"label": label, "statistic": statistic, "difference": (low + high) / 2,
                "low": low, "high": high, "line": label}
    lines = [line("fused - all-data", "average", -1.0, 1.0),
             line("a - base, retention", "retention", -9.0, -1.0),
             line("b - base, retention", "retention", 0.0, 0.0),
             line("c - base, retention", "retention", -3.0, 0.0)]
    assert shown_lines(lines) == [
        "fused - all-data", "a - base, retention",
        ("retention of the 2 other rows cannot be told apart from the base's (differences "
         "-1.50 to +0.00 points)")]


def test_a_comparison_without_common_items_is_shown_as_such():
    """A retention comparison with no items in common (low = high = None) is its own line ("no
    items in common"), not a TypeError."""
    from fashionfuse.evaluate.paired import verdict_line
    from fashionfuse.experiments.verdict import shown_lines

    empty = {"difference": None, "low": None, "high": None, "items": 0}
    lines = [{"label": "x - base, retention", "statistic": "retention", **empty,
              "line": verdict_line("x - base, retention", empty)},
             {"label": "y - base, retention", "statistic": "retention", "difference": 0.5,
              "low": -1.0, "high": 2.0, "items": 4, "line": "y"}]
    assert shown_lines(lines) == [
        "x - base, retention: no items in common",
        "retention of the 1 other rows cannot be told apart from the base's (differences "
        "+0.50 to +0.50 points)"]
