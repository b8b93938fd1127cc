"""Readers beyond the demo formats, the language filter and benchmark decontamination."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fashionfuse.curate import filters
from fashionfuse.curate.decontaminate import (
    BenchmarkIndex,
    jaccard,
    planted_paraphrase,
    read_benchmark_questions,
    shingles,
)
from fashionfuse.curate.records import Record, Rejection
from fashionfuse.curate.sources import read_source

from .conftest import SHARED


def _msg(mid, role, text, rank=None, replies=(), **kw):
    return {"message_id": mid, "role": role, "text": text, "rank": rank, "lang": "en",
            "replies": list(replies), **kw}


def test_oasst1_tree_follows_best_ranked_branch(tmp_path):
    tree = {"message_tree_id": "t1", "prompt": _msg("p", "prompter", "Root question?", replies=[
        _msg("a2", "assistant", "Second-best answer.", rank=1),
        _msg("a1", "assistant", "Best answer.", rank=0, replies=[
            _msg("u2", "prompter", "Deleted follow-up", deleted=True),
            _msg("u1", "prompter", "Follow-up?", replies=[
                _msg("b1", "assistant", "Unranked reply.", rank=None),
                _msg("b0", "assistant", "Ranked reply.", rank=0)])]),
        _msg("a0", "assistant", "Rejected by review.", rank=-1, review_result=False)])}
    path = tmp_path / "trees.jsonl"
    path.write_text(json.dumps(tree) + "\n" + json.dumps({"message_tree_id": "bad"}) + "\n")
    (where, rec), (_, bad) = list(read_source("oasst1", path, "oasst"))
    assert rec.id == "t1" and rec.meta["lang"] == "en"
    assert [m["content"] for m in rec.messages] == ["Root question?", "Best answer.", "Follow-up?",
                                                    "Ranked reply."]
    assert [m["role"] for m in rec.messages] == ["user", "assistant", "user", "assistant"]
    assert "prompt" in str(bad)


@pytest.mark.skipif(not (SHARED / "raw").is_dir(), reason="../shared/raw absent")
def test_oasst1_shared_sample_reads_every_tree():
    items = list(read_source("oasst1", SHARED / "raw" / "oasst1_en_trees_sample.jsonl", "oasst"))
    recs = [r for _, r in items if isinstance(r, Record)]
    assert len(items) == 60 and len(recs) == 60
    assert all(r.messages[0]["role"] == "user" and len(r.messages) >= 2 for r in recs)


def test_language_filter_keeps_english_drops_other():
    f = filters.language(["en"])
    en = Record("a", "t", "chat", None, [{"role": "user", "content": "How do I bake bread at home?"},
                                          {"role": "assistant", "content": "Mix flour, water and yeast, then bake it."}], {})
    zh = Record("b", "t", "chat", None, [{"role": "user", "content": "请根据上述商店名称考虑独特的商店名称。"},
                                          {"role": "assistant", "content": "好的，这里有十个新的店名。"}], {})
    assert isinstance(f(en), Record)
    rej = f(zh)
    assert isinstance(rej, Rejection) and "'zh'" in rej.reason


@pytest.mark.skipif(not (SHARED / "raw").is_dir(), reason="../shared/raw absent")
def test_language_filter_on_shared_chinese_sharegpt():
    f = filters.language(["en"])
    recs = [r for _, r in read_source("sharegpt", SHARED / "raw" / "sharegpt_zh_sample.jsonl", "zh")
            if isinstance(r, Record)]
    dropped = sum(isinstance(f(r), Rejection) for r in recs)
    assert len(recs) == 300 and dropped >= 290


QUESTIONS = [
    "Which property of a mineral can be determined just by looking at it?",
    "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect?",
    "What is the capital city of the country that hosted the 1992 Summer Olympics?",
]


def test_decontamination_drops_planted_paraphrase_and_keeps_unrelated(tmp_path):
    bench = tmp_path / "questions.txt"
    bench.write_text("\n".join(QUESTIONS) + "\n")
    index = BenchmarkIndex(read_benchmark_questions(bench), threshold=0.85)
    f = filters.decontamination(index)
    paraphrase = "an astronomer observes that a planet rotates faster after a meteorite impact - which is the most likely effect"
    assert jaccard(shingles(paraphrase), shingles(QUESTIONS[1])) > 0.85
    hit = f(Record("x", "t", "qa", None, [{"role": "user", "content": paraphrase},
                                           {"role": "assistant", "content": "Days get shorter."}], {}))
    assert isinstance(hit, Rejection) and "astronomer" in hit.reason
    keep = f(Record("y", "t", "qa", None, [{"role": "user", "content": "Which planet is largest?"},
                                            {"role": "assistant", "content": "Jupiter."}], {}))
    assert isinstance(keep, Record)


@pytest.mark.skipif(not (SHARED / "benchmarks").is_dir(), reason="../shared/benchmarks absent")
def test_index_matches_brute_force_on_planted_arc_paraphrases():
    questions = read_benchmark_questions(SHARED / "benchmarks" / "arc_challenge" / "test.jsonl")
    assert len(questions) == 1172
    index = BenchmarkIndex(questions)
    rng = np.random.default_rng(0)
    planted = [planted_paraphrase(questions[int(i)], rng) for i in rng.choice(len(questions), 40, replace=False)]
    fresh = [f"How many legs does animal number {k} have in the story?" for k in range(20)]
    for q in planted + fresh:
        slow, fast = index.brute_force_match(q), index.best_match(q)
        assert (slow is None) == (fast is None)
        if slow is not None:
            assert fast.similarity == pytest.approx(slow.similarity)
    assert sum(index.best_match(q) is not None for q in planted) >= 38


def test_benchmark_readers_understand_original_schemas(tmp_path):
    (tmp_path / "arc.jsonl").write_text(json.dumps({"question": "Q1?", "options": []}) + "\n")
    (tmp_path / "hs.jsonl").write_text(json.dumps({"ctx": "A man is", "endings": []}) + "\n")
    (tmp_path / "mmlu_test.csv").write_text("Q2?,a,b,c,d,A\n")
    (tmp_path / "TruthfulQA.csv").write_text("Type,Category,Question,Best Answer\nA,B,Q3?,x\n")
    assert sorted(read_benchmark_questions(tmp_path)) == ["A man is", "Q1?", "Q2?", "Q3?"]


def _rec(*turns, rid="r"):
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return Record(rid, "t", "chat", None, msgs, {})


def test_toxicity_filter_with_shipped_wordlist():
    phrases = filters.read_wordlist(filters.DEFAULT_WORDLIST)
    f = filters.toxicity(phrases)
    assert isinstance(f(_rec("Tell me how to make a bomb", "No.")), Rejection)
    assert isinstance(f(_rec("How do bombardier beetles defend themselves?", "They spray.")), Record)


def test_topic_filter_keeps_chosen_topics():
    f = filters.topics(["philosophy"], {"philosophy": ["meaning of life", "ethics", "philosoph"],
                                        "cooking": ["recipe"]})
    kept = f(_rec("What do philosophers say about free will?", "Many things."))
    assert isinstance(kept, Record) and kept.meta["topics"] == ["philosophy"]
    assert isinstance(f(_rec("Give me a recipe for soup", "Boil water.")), Rejection)


def test_near_duplicate_filter_catches_light_edits_only():
    f = filters.near_duplicates(threshold=0.8, ngram=5)
    base = "Explain how photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen."
    assert isinstance(f(_rec(base, "Plants use chlorophyll to capture light energy.", rid="a")), Record)
    dup = f(_rec(base.replace("Explain", "Please explain"), "Plants use chlorophyll to capture light energy!", rid="b"))
    assert isinstance(dup, Rejection) and "similar to a" in dup.reason
    assert isinstance(f(_rec("What is the tallest mountain on Earth?", "Mount Everest.", rid="c")), Record)


def test_csv_parquet_and_field_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "What is 2+2?", "completion": "4", "sys": "Be terse."},
            {"prompt": "Name a colour.", "completion": "Blue", "sys": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    with open(tmp_path / "qa.csv", "w", newline="") as fh:
        import csv as _csv

        w = _csv.DictWriter(fh, fieldnames=["prompt", "completion", "sys"])
        w.writeheader()
        w.writerows(rows)
    mapping = {"question": "prompt", "response": "completion", "system_prompt": "sys"}
    for name in ("qa.parquet", "qa.csv"):
        recs = [r for _, r in read_source("openorca", tmp_path / name, "qa", fields=mapping)]
        assert [r.queries[0] for r in recs] == ["What is 2+2?", "Name a colour."]
        assert recs[0].system == "Be terse." and recs[1].system is None
    where = [w for w, _ in read_source("openorca", tmp_path / "qa.csv", "qa", fields=mapping)]
    assert where[0].endswith("qa.csv:2")


def test_hub_style_dataset_through_datasets(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"instruction": "Say hi.", "output": "Hi!"}) + "\n")
    items = list(read_source("alpaca", None, "hubds", hub=str(folder), split="train"))
    (where, rec), = items
    assert rec.responses == ["Hi!"] and where.endswith("train:#0")


def test_oasst1_flat_message_table_becomes_best_thread(tmp_path):
    rows = [
        {"message_id": "p", "parent_id": None, "message_tree_id": "t", "role": "prompter", "text": "Q?", "lang": "en"},
        {"message_id": "a1", "parent_id": "p", "role": "assistant", "text": "Second.", "rank": 1},
        {"message_id": "a0", "parent_id": "p", "role": "assistant", "text": "Best.", "rank": 0},
        {"message_id": "u", "parent_id": "a0", "role": "prompter", "text": "More?"},
        {"message_id": "b", "parent_id": "u", "role": "assistant", "text": "Sure.", "rank": 0},
        {"message_id": "x", "parent_id": "missing", "role": "assistant", "text": "Orphan."},
    ]
    path = tmp_path / "messages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = list(read_source("oasst1_messages", path, "oa"))
    recs = [r for _, r in out if isinstance(r, Record)]
    bad = [(w, r) for w, r in out if not isinstance(r, Record)]
    (rec,) = recs
    assert rec.id == "t" and [m["content"] for m in rec.messages] == ["Q?", "Best.", "More?", "Sure."]
    assert len(bad) == 1 and bad[0][0].endswith("messages.jsonl:6") and "not found" in str(bad[0][1])


def test_toxicity_classifier_thresholds(tiny_model, tmp_path):
    """Plumbing of the optional classifier with a tiny random model: threshold decides."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tiny_model, num_labels=2, id2label={0: "ok", 1: "toxic"},
                                        label2id={"ok": 0, "toxic": 1}, pad_token_id=0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "clf")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "clf")
    record = _rec("Hello there", "General Kenobi")
    strict = filters.toxicity_classifier(str(tmp_path / "clf"), ["toxic"], threshold=0.0)
    rej = strict(record)
    assert isinstance(rej, Rejection) and "'toxic'" in rej.reason
    lenient = filters.toxicity_classifier(str(tmp_path / "clf"), ["toxic"], threshold=1.0)
    assert isinstance(lenient(_rec("Hello there", "General Kenobi")), Record)


def test_airoboros_and_sharegpt_aliases(tmp_path):
    airo = tmp_path / "airoboros.jsonl"
    airo.write_text(json.dumps({"instruction": "Write a haiku.", "response": "Soft rain on the roof."}) + "\n")
    (_, rec), = list(read_source("airoboros", airo, "airo"))
    assert rec.queries == ["Write a haiku."] and rec.responses == ["Soft rain on the roof."]
    puffin = tmp_path / "puffin.json"
    puffin.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"},
                                                     {"from": "gpt", "value": "Hello!"}]}]))
    for fmt in ("puffin", "samantha"):
        (_, rec), = list(read_source(fmt, puffin, fmt))
        assert rec.kind == "chat" and rec.responses == ["Hello!"]
