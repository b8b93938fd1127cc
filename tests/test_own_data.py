"""A user's own model and data: the `messages` format and nested field mappings, mistakes
caught by `validate` before any work, streaming duplicate removal, and adapters a user can take
away (a loadable base reference and a model card)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fashionfuse.cli import app
from fashionfuse.curate import filters
from fashionfuse.curate.decontaminate import jaccard, shingles
from fashionfuse.curate.dedup import DedupState, NearParams, conversation_text, record_keys
from fashionfuse.curate.records import MalformedRow, Record
from fashionfuse.curate.sources import read_source

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Which colour does person {i} like?"},
            {"role": "assistant", "content": f"Person {i} likes colour number {i * 7 % 11}."},
            {"role": "user", "content": "And the opposite of hot?"},
            {"role": "assistant", "content": f"Cold, person {i}."}]


# --------------------------------------------------------------------------- readers
def test_messages_rows_read_with_system_turns_fields_and_text_parts(tmp_path):
    src = _rows(tmp_path / "m.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, *_chat(1)]},
        {"system": "From a field.", "messages": _chat(2)},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                    {"type": "text", "text": "there"}]},
                      {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                      {"role": "assistant", "content": "A cat."}]},
        {"messages": [{"role": "narrator", "content": "?"}]},
        {"messages": [*_chat(3)[:2], {"role": "system", "content": "late"}]},
    ])
    got = list(read_source("messages", src, "m"))
    recs = [r for _, r in got if isinstance(r, Record)]
    bad = [(w, str(r)) for w, r in got if isinstance(r, MalformedRow)]
    assert [r.system for r in recs] == ["Be brief.", "From a field.", None]
    assert recs[0].messages == _chat(1) and recs[2].messages[0]["content"] == "Hi there"
    assert [w.rsplit(":", 1)[1] for w, _ in bad] == ["4", "5", "6"]
    assert "'image_url' part, not text" in bad[0][1] and "unknown role 'narrator'" in bad[1][1]
    assert "system turn after the conversation started" in bad[2][1]


def test_field_mapping_reaches_nested_keys_and_turn_keys(tmp_path):
    """A ShareGPT-style file with other key names reads as `messages` (or as `sharegpt`) by
    naming its keys, nested ones included."""
    turns = [{"speaker": "human", "text": "Q?"}, {"speaker": "gpt", "text": "A."}]
    src = _rows(tmp_path / "n.jsonl", [{"data": {"id": "x1", "turns": turns}}])
    (rec,) = [r for _, r in read_source(
        "messages", src, "n", fields={"id": "data.id", "messages": "data.turns",
                                      "role": "speaker", "content": "text"})]
    assert rec.id == "x1" and rec.messages == [{"role": "user", "content": "Q?"},
                                               {"role": "assistant", "content": "A."}]
    src2 = _rows(tmp_path / "s.jsonl", [{"conv": [{"role": "user", "content": "Q?"},
                                                  {"role": "assistant", "content": "A."}]}])
    (rec2,) = [r for _, r in read_source(
        "sharegpt", src2, "s", fields={"conversations": "conv", "from": "role", "value": "content"})]
    assert rec2.messages == rec.messages


def test_a_field_mapping_names_only_the_formats_fields(make_config):
    path = make_config(datasets=[{"name": "c", "kind": "chat", "source": {
        "format": "messages", "path": "x.jsonl", "fields": {"rol": "speaker"}}}])
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "datasets.0.source: Value error, fields: ['rol'] are not fields of format messages" \
        in result.output and "role, content" in result.output


def test_a_messages_file_curates_with_no_rejects_and_trains(make_config, tmp_path):
    src = _rows(tmp_path / "chats.jsonl",
                [{"id": f"c{i}", "messages": ([{"role": "system", "content": "Be kind."}]
                                              if i % 2 else []) + _chat(i)} for i in range(40)])
    path = make_config(datasets=[{"name": "mine", "kind": "chat",
                                  "source": {"format": "messages", "path": str(src)}}],
                       training={"max_steps": 2, "batch_size": 4, "micro_batch_size": 4,
                                 "learning_rate": 1e-3, "lora": {"r": 2, "alpha": 4}})
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["curate", str(path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run" / "curate" / "mine"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["instances"] == 40 and (out / "rejects.jsonl").read_text() == ""
    assert stats["funnel"] == {"read": 40}
    result = runner.invoke(app, ["train-adapter", str(path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "adapters" / "mine" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- validate
def _validate(path: Path) -> tuple[int, list[str]]:
    result = runner.invoke(app, ["validate", str(path)])
    return result.exit_code, [x for x in result.output.splitlines() if x.startswith("error:")]


def test_a_misspelt_base_path_is_refused_before_anything_is_written(make_config, tmp_path):
    for base, why in (("./models/Llama-3-8B", "no such folder or file"),
                      (str(tmp_path / "nope" / "model"), "no such folder or file")):
        path = make_config(model={"base": base})
        code, errors = _validate(path)
        assert code == 2 and any(f"model.base: {base}: {why}" in e for e in errors), errors
        result = runner.invoke(app, ["curate", str(path)])
        assert result.exit_code == 2 and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
    empty = tmp_path / "empty-model"
    empty.mkdir()
    code, errors = _validate(make_config(model={"base": str(empty)}))
    assert code == 2 and any("local folder without config.json or a tokenizer" in e for e in errors)


def test_a_hub_id_base_is_taken_for_one_and_said(make_config, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = make_config(model={"base": "someone/not-cached-model"})
    result = runner.invoke(app, ["validate", str(path)])
    assert "model.base taken as a hub id" in result.output
    assert "not in the local hub cache (HF_HUB_OFFLINE is set)" in result.output
    result = runner.invoke(app, ["curate", str(path)])  # a stage cannot load it: refused
    assert result.exit_code == 2 and "not in the local hub cache" in result.output


def test_an_axolotl_style_config_is_refused_in_one_pass(tmp_path):
    path = tmp_path / "axolotl.yaml"
    path.write_text(yaml.safe_dump({
        "base_model": "meta-llama/Llama-2-7b-hf", "load_in_4bit": True, "adapter": "qlora",
        "datasets": [{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}],
        "lora_r": 32, "learning_rate": 0.0002, "output_dir": "./outputs"}))
    code, errors = _validate(path)
    assert code == 2 and not (tmp_path / "outputs").exists()
    text = "\n".join(errors)
    for expected in ("base_model: unknown key", "datasets.0.path: unknown key",
                     "run_dir: Field required", "model: Field required",
                     "this looks like an axolotl config"):
        assert expected in text, text


def test_every_problem_in_one_pass_with_the_closest_key(make_config):
    path = make_config(training={"learnin_rate": 1e-3},
                       datasets=[{"name": "a", "kind": "chat", "source": {"format": "sharegpt",
                                                                          "path": "x.jsonl"}},
                                 {"name": "a", "kind": "qa", "source": {"format": "alpaca",
                                                                        "path": "y.json"}}])
    code, errors = _validate(path)
    text = "\n".join(errors)
    assert code == 2
    assert "training.learnin_rate: unknown key (did you mean learning_rate?)" in text, text
    assert "datasets: duplicate names ['a']" in text, text


def test_cross_checks_report_every_problem(make_config):
    path = make_config(search={"adapters": ["nope"]}, ablate={"sequential_order": ["chat"]})
    code, errors = _validate(path)
    text = "\n".join(errors)
    assert code == 2 and "search.adapters: unknown names ['nope']" in text
    assert "ablate.sequential_order: must list every dataset once" in text


def test_the_examples_validate_offline():
    """examples/: a Llama 3, a Qwen2.5 and a Mistral config, validated (nothing downloaded)."""
    configs = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(configs) >= 3
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for path in configs:
            result = runner.invoke(app, ["validate", str(path.relative_to(ROOT))],
                                   env={"HF_HUB_OFFLINE": "1"})
            assert result.exit_code == 0, (path, result.output)
            assert "model.base taken as a hub id" in result.output
    finally:
        os.chdir(cwd)


# --------------------------------------------------------------------------- dedup
def _near_corpus(n: int, seed: int = 0) -> list[Record]:
    rng = random.Random(seed)
    words = [f"w{k}" for k in range(300)]
    base = [" ".join(rng.choices(words, k=40)) for _ in range(n // 3)]
    recs = []
    for i in range(n):
        text = rng.choice(base).split()
        for _ in range(rng.randint(0, 6)):  # light edits: near duplicates of various degrees
            text[rng.randrange(len(text))] = rng.choice(words)
        recs.append(Record(f"r{i}", "t", "qa", None, [{"role": "user", "content": "q"},
                                                       {"role": "assistant", "content": " ".join(text)}]))
    return recs


def test_streaming_near_dedup_agrees_with_brute_force(tmp_path):
    """Every near duplicate reported is one (exact Jaccard); recall against the brute-force
    greedy pass stays high; the state kept per record is keys and an offset, not shingles."""
    recs = _near_corpus(600)
    near = NearParams(0.8, 5)
    state = DedupState(exact=True, near=near, spill=tmp_path / "spill")
    kept_sh, truth, found, wrong = [], 0, 0, 0
    for rec in recs:
        sh = shingles(conversation_text(rec), 5)
        is_dup = any(jaccard(sh, k) > 0.8 for k in kept_sh)
        rej = state.check(rec.id, record_keys(rec, True, near), conversation_text(rec))
        truth += is_dup
        found += is_dup and rej is not None
        wrong += (not is_dup) and rej is not None and rej.filter == "near_duplicate" and \
            not any(jaccard(sh, k) > 0.8 for k in kept_sh)
        if rej is None:
            kept_sh.append(sh)
    state.close()
    assert truth > 50 and wrong == 0
    assert found / truth >= 0.95, (found, truth)


def test_exact_and_near_filters_name_the_record_they_repeat():
    exact, near = filters.exact_duplicates(), filters.near_duplicates(0.8, 5)
    a = Record("a", "t", "qa", None, [{"role": "user", "content": "Q"},
                                      {"role": "assistant", "content": "the same answer here"}])
    b = Record("b", "t", "qa", None, [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "The  same answer here"}])
    assert exact(a) is a and exact(b).reason == "same conversation as a"
    assert near(a) is a and near(b).reason.endswith("similar to a")


# --------------------------------------------------------------------------- artifacts
def test_adapters_record_a_loadable_base_and_carry_a_model_card(pipeline_run, tmp_path):
    """Trained and fused adapters name the base by absolute path, so PEFT loads them from any
    folder; each has a model card with its datasets (or weights) and the command."""
    from peft import AutoPeftModelForCausalLM

    run = pipeline_run["run_dir"]
    model = Path(pipeline_run["model"]).resolve()
    for adapter in (run / "adapters" / "chat", run / "search" / "fused"):
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(model)
        card = (adapter / "README.md").read_text()
        assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
        assert "fashionfuse" in card and "AutoPeftModelForCausalLM" in card
    assert "trained on chat" in (run / "adapters" / "chat" / "README.md").read_text()
    best = json.loads((run / "search" / "best.json").read_text())
    fused_card = (run / "search" / "fused" / "README.md").read_text()
    assert all(f"{k} {v:.4g}" in fused_card for k, v in best["best_weights"].items())
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        loaded = AutoPeftModelForCausalLM.from_pretrained(str(run / "search" / "fused"))
    finally:
        os.chdir(cwd)
    assert type(loaded).__name__.startswith("Peft")


def test_key_index_finds_every_position_of_every_key():
    """The compact multimap behind duplicate removal, against a plain dict, across flushes
    into sorted runs and their merges (a tiny buffer forces both)."""
    import numpy as np

    from fashionfuse.curate.minhash import KeyIndex

    rng = random.Random(0)
    index, ref = KeyIndex(buffer_keys=50), {}
    for p in range(3000):
        keys = [rng.randrange(700) for _ in range(3)]
        index.add(np.array(keys, dtype=np.uint64), p)
        for k in set(keys):
            ref.setdefault(k, []).append(p)
        if p % 53 == 0:
            query = np.array([rng.randrange(800) for _ in range(4)], dtype=np.uint64)
            assert index.candidates(query) == sorted({x for k in query.tolist()
                                                      for x in ref.get(k, [])})
    assert len(index) == sum(len(v) for v in ref.values())
