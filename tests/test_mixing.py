"""`adapters[].mix`: one adapter's training tokens split between its datasets by share."""

from __future__ import annotations

import pytest

from fashionfuse.train.mixing import mix_examples


def _examples(tag: str, lengths: list[int], prompt: int = 0) -> list[dict]:
    """Examples of `prompt` masked tokens then `n` supervised ones (the first position is never
    a target, as in a real example: it starts with the masked BOS)."""
    return [{"input_ids": [0] * (prompt + n + 1), "labels": [-100] * (prompt + 1) + [7] * n,
             "tag": tag, "i": i} for i, n in enumerate(lengths)]


def test_shares_split_the_concatenations_token_budget():
    big = _examples("big", [30] * 40)  # 1,200 tokens
    small = _examples("small", [20] * 5)  # 100 tokens
    mixed, record = mix_examples({"big": big, "small": small}, {"big": 1, "small": 1}, seed=3)
    budget = 1300
    for name, longest in (("big", 30), ("small", 20)):
        r = record[name]
        assert r["share"] == 0.5 and r["target_supervised_tokens"] == budget // 2
        assert 0 <= r["supervised_tokens"] - r["target_supervised_tokens"] < longest
        assert r["supervised_tokens"] == sum(len(e["input_ids"]) - 1 for e in mixed
                                             if e["tag"] == name)
    assert record["small"]["passes"] == 7  # 650 tokens from a 100-token set: repeated
    assert record["big"]["passes"] == 1 and record["big"]["examples"] == 22  # a subsample
    # each pass over a dataset takes every example once before any repeats: no example of the
    # small set is taken two times more often than another
    from collections import Counter

    counts = Counter(e["i"] for e in mixed if e["tag"] == "small")
    assert len(counts) == 5 and max(counts.values()) - min(counts.values()) <= 1
    # shuffled together: both datasets appear early, not one block after the other
    assert {e["tag"] for e in mixed[:12]} == {"big", "small"}


def test_shares_count_the_supervised_tokens_not_the_prompts():
    """A dataset of long masked prompts and short answers gets its share of what the loss
    trains on: its prompt tokens do not count against its budget."""
    from fashionfuse.train.mixing import supervised_tokens

    chatty = _examples("chatty", [40] * 30)  # 1,200 supervised tokens, no prompt
    terse = _examples("terse", [5] * 60, prompt=95)  # 300 supervised in 6,000 input tokens
    mixed, record = mix_examples({"chatty": chatty, "terse": terse},
                                 {"chatty": 1, "terse": 1}, seed=0)
    budget = 1200 + 300
    trained = {name: sum(supervised_tokens(e) for e in mixed if e["tag"] == name)
               for name in ("chatty", "terse")}
    assert trained == {n: record[n]["supervised_tokens"] for n in trained}
    assert abs(trained["chatty"] - budget / 2) < 40 and abs(trained["terse"] - budget / 2) < 5
    assert record["terse"]["input_tokens"] == record["terse"]["examples"] * 101
    assert record["chatty"]["input_tokens"] == record["chatty"]["examples"] * 41


def test_mix_is_seeded_and_a_zero_share_drops_a_dataset():
    data = {"a": _examples("a", [10, 12, 14, 16]), "b": _examples("b", [11, 13])}
    one, rec = mix_examples(data, {"a": 2, "b": 1}, seed=1)
    assert one == mix_examples(data, {"a": 2, "b": 1}, seed=1)[0]
    assert one != mix_examples(data, {"a": 2, "b": 1}, seed=2)[0]
    assert rec["a"]["share"] == pytest.approx(2 / 3, abs=1e-6)
    none, rec = mix_examples(data, {"a": 1, "b": 0}, seed=1)
    assert rec["b"]["examples"] == 0 and all(e["tag"] == "a" for e in none)


def test_mix_must_name_the_adapters_datasets(make_config):
    """A mix that does not match its datasets is reported with every other cross-field problem
    of the config, in one pass (it used to stop validation and hide them)."""
    from fashionfuse.config import AdapterSpec, ConfigError, load_config

    assert AdapterSpec(name="m", datasets=["a", "b"], mix={"a": 1, "b": 3}).mix_problems() == []
    assert "give a share for each of datasets" in \
        AdapterSpec(name="m", datasets=["a", "b"], mix={"a": 1}).mix_problems()[0]
    assert "must not all be 0" in \
        AdapterSpec(name="m", datasets=["a", "b"], mix={"a": 0, "b": 0}).mix_problems()[0]
    path = make_config(adapters=[{"name": "m", "datasets": ["chat", "orca"], "mix": {"chat": 1}}],
                       search={"adapters": ["nope"]}, ablate={"sequential_order": ["chat"]})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = "\n".join(err.value.problems)
    assert "adapters.0.mix: give a share for each of datasets" in text
    assert "search.adapters: unknown names ['nope']" in text
    assert "ablate.sequential_order: must list every dataset once" in text


def test_mixed_ratio_reads_layer_wise_weights_as_their_block_mean():
    from fashionfuse.experiments.ablate import adapter_mean_weights

    weights = {"a@0": 1.0, "a@1": 3.0, "a": 0.5, "b@0": 2.0, "b@1": 2.0}
    assert adapter_mean_weights(weights, ["a", "b"]) == {"a": 1.0, "b": 2.0}
    assert adapter_mean_weights({"a": 0.3, "b": 0.7}, ["a", "b"]) == {"a": 0.3, "b": 0.7}
