"""Curation: readers, each filter (one record that goes, one that stays), splitting, determinism."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from fashionfuse.cli import app
from fashionfuse.config import FilterConfig, IdentityFilterConfig
from fashionfuse.curate import filters
from fashionfuse.curate.records import MalformedRow, Record, Rejection
from fashionfuse.curate.sources import read_source
from fashionfuse.curate.split import split_to_fit, train_validation_split

from .conftest import stop_after

runner = CliRunner()


def rec(*turns, model="gpt-4", system=None, rid="r1") -> Record:
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return Record(id=rid, source="t", kind="chat", system=system, messages=msgs, meta={"model": model})


def test_sharegpt_reader_normalises_roles_and_reports_bad_rows(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "a", "model": "gpt-4", "conversations": [
            {"from": "system", "value": "Be kind."}, {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"}]}),
        "{not json",
        json.dumps({"id": "c", "conversations": [{"from": "alien", "value": "x"}]}),
    ]) + "\n")
    out = list(read_source("sharegpt", path, "s"))
    good = out[0][1]
    assert isinstance(good, Record) and good.system == "Be kind." and good.meta["model"] == "gpt-4"
    assert good.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert out[1][0].endswith("s.jsonl:2") and isinstance(out[1][1], MalformedRow)
    assert "unknown speaker" in str(out[2][1])


def test_openorca_and_alpaca_readers(tmp_path):
    orca = tmp_path / "o.jsonl"
    orca.write_text(json.dumps({"id": "o1", "system_prompt": "S", "question": "Q?", "response": "R."}) + "\n")
    (r,) = [x for _, x in read_source("openorca", orca, "o")]
    assert r.system == "S" and r.queries == ["Q?"] and r.responses == ["R."]
    alp = tmp_path / "a.json"
    alp.write_text(json.dumps([{"instruction": "Do X.", "input": "data", "output": "done"},
                               {"instruction": "No output"}]))
    out = list(read_source("alpaca", alp, "a"))
    assert out[0][1].queries == ["Do X.\n\ndata"]
    assert isinstance(out[1][1], MalformedRow) and "'output'" in str(out[1][1])


def test_answering_model_filter():
    f = filters.answering_model(["gpt-4"])
    assert isinstance(f(rec("q", "a", model="gpt-3.5-turbo")), Rejection)
    assert isinstance(f(rec("q", "a", model="GPT-4")), Record)


def test_blank_response_filter():
    assert isinstance(filters.blank_response(rec("q", "  ")), Rejection)
    assert isinstance(filters.blank_response(rec("q", "fine")), Record)


def test_refusal_filter():
    f = filters.refusal(FilterConfig().refusal_patterns)
    assert isinstance(f(rec("q", "As an AI language model, I can't.")), Rejection)
    assert isinstance(f(rec("q", "Paris is the capital.")), Record)


def test_identity_filter_replaces_or_drops():
    cfg = IdentityFilterConfig()
    replace = filters.identity(cfg.patterns, "replace", "FashionGPT")
    out = replace(rec("Are you ChatGPT?", "I am ChatGPT by OpenAI."))
    assert out.messages[1]["content"] == "I am FashionGPT by FashionGPT."
    assert out.messages[0]["content"] == "Are you FashionGPT?"
    drop = filters.identity(cfg.patterns, "drop", "x")
    assert isinstance(drop(rec("q", "OpenAI said so")), Rejection)
    assert isinstance(drop(rec("q", "nothing to see")), Record)


def test_identity_filter_leaves_code_and_identifiers_alone():
    """Proper names as written in prose are replaced; code (fenced, inline, or lower-case
    identifiers such as a package name or a model id string) is never rewritten."""
    replace = filters.identity(IdentityFilterConfig().patterns, "replace", "FashionGPT")
    answer = ("I am ChatGPT, made by OpenAI (like GPT-4 and Chat GPT; chatGPT, GPT4).\n"
              "Call it with `import openai`:\n"
              "```python\nimport openai\nclient = OpenAI()\nclient.create(model='GPT-4')\n```\n"
              "In prose: openai is a package; the model id is gpt-4; GPT-4o is another model.")
    out = replace(rec("q", answer)).messages[1]["content"]
    assert out.startswith("I am FashionGPT, made by FashionGPT (like FashionGPT and FashionGPT; "
                          "FashionGPT, FashionGPT).")
    assert "`import openai`" in out
    assert "```python\nimport openai\nclient = OpenAI()\nclient.create(model='GPT-4')\n```" in out
    assert out.endswith("In prose: openai is a package; the model id is gpt-4; GPT-4o is another model.")
    drop = filters.identity(IdentityFilterConfig().patterns, "drop", "x")
    assert isinstance(drop(rec("q", "```\nfrom openai import OpenAI\n```")), Record)


def test_refusal_filter_matches_curly_apostrophes_and_cant():
    f = filters.refusal(FilterConfig().refusal_patterns)
    assert isinstance(f(rec("q", "I\u2019m sorry, but I can\u2019t help with that.")), Rejection)
    assert isinstance(f(rec("q", "I'm sorry, but I can't help with that.")), Rejection)
    assert isinstance(f(rec("q", "I\u2019m sorry,\nbut I cannot do it.")), Rejection)
    assert isinstance(f(rec("q", "I can\u2019t wait to see Paris!")), Record)


def test_split_segments_of_one_chat_stay_in_one_split():
    """A chat split to fit the context yields segments `id#k`; all land on the same side."""
    records = []
    for i in range(40):
        turns = [f"question {i}.{t}" if t % 2 == 0 else f"answer {i}.{t}" for t in range(8)]
        whole = rec(*turns, rid=f"chat{i}")
        pieces = split_to_fit(whole, lambda msgs, system: 10 * len(msgs), 40)
        assert isinstance(pieces, list) and len(pieces) == 2
        records += pieces
    train, val = train_validation_split(records, 0.25, seed=3)
    parents = lambda rs: {r.meta["parent"] for r in rs}  # noqa: E731
    assert val and train and not parents(train) & parents(val)
    assert len(val) == 20 and len(train) + len(val) == 80


def test_length_filter():
    f = filters.response_length(3, 10)
    assert isinstance(f(rec("q", "ok")), Rejection)
    assert isinstance(f(rec("q", "x" * 11)), Rejection)
    assert isinstance(f(rec("q", "fine")), Record)


def test_exact_duplicate_filter_keeps_first():
    f = filters.exact_duplicates()
    assert isinstance(f(rec("Hi", "Hello", rid="a")), Record)
    dup = f(rec("hi ", "hello", rid="b"))
    assert isinstance(dup, Rejection) and "a" in dup.reason
    assert isinstance(f(rec("Hi", "Goodbye", rid="c")), Record)


def test_structure_filter_drops_trailing_user_and_rejects_bad_order():
    out = filters.structure(rec("q", "a", "dangling"))
    assert len(out.messages) == 2
    bad = Record("x", "t", "chat", None, [{"role": "assistant", "content": "a"}], {})
    assert isinstance(filters.structure(bad), Rejection)


def test_split_to_fit_cuts_only_at_turn_boundaries():
    r = rec("q1", "a1", "q2", "a2", "q3", "a3", "q4", "a4")
    count = lambda msgs, system: 10 * len(msgs)  # 20 tokens per pair  # noqa: E731
    pieces = split_to_fit(r, count, max_tokens=45)
    assert [len(p.messages) for p in pieces] == [4, 4]
    assert [m["content"] for p in pieces for m in p.messages] == [m["content"] for m in r.messages]
    assert all(p.messages[0]["role"] == "user" and p.messages[-1]["role"] == "assistant" for p in pieces)
    assert [p.id for p in pieces] == ["r1#0", "r1#1"]
    assert isinstance(split_to_fit(r, count, max_tokens=15), Rejection)
    assert split_to_fit(r, count, max_tokens=80) == [r]


def test_train_validation_split_is_deterministic_and_disjoint():
    recs = [rec("q", "a", rid=f"r{i}") for i in range(50)]
    t1, v1 = train_validation_split(recs, 0.2, seed=3)
    t2, v2 = train_validation_split(list(reversed(recs)), 0.2, seed=3)
    assert {r.id for r in v1} == {r.id for r in v2} and len(v1) == 10
    assert not {r.id for r in t1} & {r.id for r in v1}
    _, v3 = train_validation_split(recs, 0.2, seed=4)
    assert {r.id for r in v3} != {r.id for r in v1}


def test_curate_cli_end_to_end_is_deterministic(make_config, tmp_path):
    path = make_config(run_dir=tmp_path / "a")
    assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
    again = make_config(run_dir=tmp_path / "b")
    assert runner.invoke(app, ["curate", str(again)]).exit_code == 0
    for ds in ("chat", "orca"):
        for f in ("train.jsonl", "validation.jsonl", "rejects.jsonl", "stats.json"):
            assert (tmp_path / "a/curate" / ds / f).read_bytes() == (tmp_path / "b/curate" / ds / f).read_bytes()
    stats = json.loads((tmp_path / "a/curate/chat/stats.json").read_text())
    assert stats["instances"] == 60 and stats["train"] + stats["validation"] == 60
    assert stats["funnel"]["answering_model"] > 0
    assert stats["funnel"]["segments_added"] > 0  # long chats split to fit max_input_len=128
    orca_rejects = [json.loads(x) for x in (tmp_path / "a/curate/orca/rejects.jsonl").read_text().splitlines()]
    (malformed,) = [r for r in orca_rejects if r["filter"] == "malformed"]
    assert malformed["where"].endswith("orca_openorca.jsonl:11") and "'question'" in malformed["reason"]
    rejects = [json.loads(x) for x in (tmp_path / "a/curate/chat/rejects.jsonl").read_text().splitlines()]
    assert {"blank_response", "answering_model", "refusal"} <= {r["filter"] for r in rejects}
    table = (tmp_path / "a/curate/table1.md").read_text()
    assert "| chat | chat | 60 |" in table
    train = [json.loads(x) for x in (tmp_path / "a/curate/chat/train.jsonl").read_text().splitlines()]
    # no recipe: the user's data is left as it is (no identity rewrite, no system line added)
    assert any("ChatGPT" in m["content"] or "OpenAI" in m["content"] for r in train for m in r["messages"])
    assert "identity_rewritten" not in stats["funnel"]
    assert all(r["system"] is None for r in train)
    manifest = json.loads((tmp_path / "a/curate/chat/manifest.json").read_text())
    assert manifest["stage"] == "curate" and manifest["seed"] == 7 and "torch" in manifest["versions"]


def test_fashiongpt_recipe_rewrites_identity_and_says_how_many(make_config, tmp_path):
    """`recipe: fashiongpt` is the paper's recipe: identity mentions replaced (and counted),
    the paper's system message and Table 9 template; an explicit field still wins."""
    from fashionfuse.config import load_config

    path = make_config(recipe="fashiongpt")
    result = runner.invoke(app, ["curate", str(path)])
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "run/curate/chat/stats.json").read_text())
    assert stats["funnel"]["identity_rewritten"] > 0
    assert f"identity mentions rewritten in {stats['funnel']['identity_rewritten']}" in result.output
    train = [json.loads(x) for x in (tmp_path / "run/curate/chat/train.jsonl").read_text().splitlines()]
    assert not any("ChatGPT" in m["content"] or "OpenAI" in m["content"] for r in train for m in r["messages"])
    assert any("FashionGPT" in m["content"] for r in train for m in r["messages"])
    cfg = load_config(path)
    assert cfg.model.system_message == "You are an AI assistant named FashionGPT."
    assert cfg.model.chat_template == "table9" and cfg.dataset("chat").filters.identity.action == "replace"
    neutral = load_config(make_config())
    assert neutral.model.system_message is None and neutral.model.chat_template == "auto"
    assert neutral.dataset("chat").filters.identity.action == "off"
    kept = load_config(path, ["datasets.0.filters.identity.action=drop", "model.chat_template=model"])
    assert kept.dataset("chat").filters.identity.action == "drop" and kept.model.chat_template == "model"
    assert kept.dataset("orca").filters.identity.action == "replace"


def test_strict_mode_fails_on_malformed_row(make_config):
    result = runner.invoke(app, ["curate", str(make_config()), "--set", "curate.strict=true"])
    assert result.exit_code == 2
    assert re.search(r"error: .*\S+\.jsonl:\d+: (invalid JSON|missing field)", result.output), result.output


def test_curate_skips_up_to_date_and_redoes_changed(make_config):
    path = make_config()
    runner.invoke(app, ["curate", str(path)])
    second = runner.invoke(app, ["curate", str(path)])
    assert "curate chat: up to date" in second.output
    changed = runner.invoke(app, ["curate", str(path), "--set", "datasets.0.max_records=30"])
    assert "curate chat: read" in changed.output and "curate orca: up to date" in changed.output


def test_curate_decontaminates_against_benchmark_file(make_config, tmp_path):
    bench = tmp_path / "bench.txt"
    from fashionfuse.demo import OPPOSITES

    bench.write_text("".join(f"Which word means the opposite of {a}?\n" for pair in OPPOSITES for a in pair))
    path = make_config(curate={"decontaminate": {"benchmarks": [str(bench)]}})
    result = runner.invoke(app, ["curate", str(path)])
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "run/curate/orca/stats.json").read_text())
    assert stats["funnel"]["decontamination"] >= 1
    train = (tmp_path / "run/curate/orca/train.jsonl").read_text()
    assert "Which word means the opposite of" not in train
    assert "What is the opposite of" in train  # other phrasings are far below 85 % similar
    rejects = [json.loads(x) for x in (tmp_path / "run/curate/orca/rejects.jsonl").read_text().splitlines()]
    assert any(r["filter"] == "decontamination" and "similar to benchmark" in r["reason"] for r in rejects)


def _curate_bytes(run) -> dict[str, bytes]:
    return {f"{ds}/{f}": (run / "curate" / ds / f).read_bytes()
            for ds in ("chat", "orca") for f in ("train.jsonl", "validation.jsonl", "rejects.jsonl")}


def test_sharded_parallel_curation_matches_single_process(make_config, tmp_path):
    one = make_config(run_dir=tmp_path / "one", curate={"shard_size": 25, "num_proc": 1})
    two = make_config(run_dir=tmp_path / "two", curate={"shard_size": 25, "num_proc": 2})
    assert runner.invoke(app, ["curate", str(one)]).exit_code == 0
    assert runner.invoke(app, ["curate", str(two)]).exit_code == 0
    assert _curate_bytes(tmp_path / "one") == _curate_bytes(tmp_path / "two")
    assert not list((tmp_path / "two" / "curate").glob(".*.work"))  # work dirs cleaned up


def test_interrupted_curation_resumes_from_finished_shards(make_config, tmp_path):
    from fashionfuse.base_model import load_tokenizer
    from fashionfuse.config import load_config
    from fashionfuse.curate.pipeline import curate_dataset

    path = make_config(curate={"shard_size": 20, "num_proc": 1})
    cfg = load_config(path)
    work = tmp_path / "run" / "curate" / ".orca.work"
    out = tmp_path / "partial"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        curate_dataset(cfg, cfg.dataset("orca"), load_tokenizer(cfg.model), out, work=work,
                       progress=stop_after(2))
    finished = sorted(p.name for p in work.glob("shard-*.json"))
    assert finished == ["shard-000000.json", "shard-000001.json"]
    # mark the finished shards so re-filtering them would show
    for f in work.glob("shard-*.json"):
        data = json.loads(f.read_text())
        data["funnel"]["resumed_marker"] = 1
        f.write_text(json.dumps(data))
    from fashionfuse.curate.pipeline import curate_fingerprint

    (work / "fingerprint").write_text(curate_fingerprint(cfg, cfg.dataset("orca")))
    result = runner.invoke(app, ["curate", str(path)])
    assert result.exit_code == 0, result.output
    assert "curate orca: resuming from 2 finished shards" in result.output
    stats = json.loads((tmp_path / "run/curate/orca/stats.json").read_text())
    assert stats["funnel"]["resumed_marker"] == 2  # the two shards were loaded, not recomputed
    fresh = make_config(run_dir=tmp_path / "fresh", curate={"shard_size": 20, "num_proc": 1})
    assert runner.invoke(app, ["curate", str(fresh)]).exit_code == 0
    assert _curate_bytes(tmp_path / "run") == _curate_bytes(tmp_path / "fresh")


def test_a_filter_dropping_most_rows_is_warned_and_the_funnel_reconciles(make_config, tmp_path):
    """At a tiny context nearly every chat is too long: say so, naming the setting; rows read
    but left out by max_records are counted too, so read = kept + rejected + unused."""
    import yaml

    base = yaml.safe_load(make_config().read_text())["model"]["base"]
    path = make_config(model={"base": base, "max_input_len": 40})
    result = runner.invoke(app, ["curate", str(path)])
    assert result.exit_code == 0, result.output
    found = re.search(r"curate warning: orca: filter 'too_long' removed (\d+) of (\d+) rows "
                      r"\((\d+) %\); check model.max_input_len", result.output)
    assert found, result.output
    removed, total, pct = map(int, found.groups())
    orca = json.loads((tmp_path / "run" / "curate" / "orca" / "stats.json").read_text())["funnel"]
    assert removed == orca["too_long"] and removed > total / 2 and pct == round(100 * removed / total)
    for name in ("chat", "orca"):
        stats = json.loads((tmp_path / "run" / "curate" / name / "stats.json").read_text())
        f = stats["funnel"]
        rejected = sum(v for k, v in f.items()
                       if k not in ("read", "segments_added", "qa_truncated", "over_max_records"))
        assert f["read"] + f.get("segments_added", 0) == (
            stats["instances"] + rejected + f.get("over_max_records", 0))


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0])
def test_near_dedup_banding_finds_a_pair_at_the_threshold(threshold):
    """LSH banding proposes a pair exactly at the configured similarity with probability
    >= 1 - 1e-4 (a floor of 0.5 on the candidate threshold missed 13 % of pairs at 0.6 and 45 %
    at 0.5), within the 128 permutations."""
    from fashionfuse.curate.dedup import NUM_PERM, NearParams

    bands, rows = NearParams(threshold, 5).bands_rows
    assert bands * rows <= NUM_PERM
    assert (1 - threshold ** rows) ** bands <= 1e-4


def test_near_dedup_threshold_below_what_banding_can_find_is_refused():
    from fashionfuse.config import NearDedupConfig

    with pytest.raises(ValueError, match="threshold"):
        NearDedupConfig(enabled=True, threshold=0.05)
