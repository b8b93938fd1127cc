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
    assert "datasets.0.source: fields: ['rol'] are not fields of format messages" \
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


def _misspelt_hub_ids(make_config) -> Path:
    """A config whose base and second dataset name hub ids that do not exist."""
    cfg = yaml.safe_load(make_config().read_text())
    cfg["model"]["base"] = "meta-llama/Llama-3-8B-Instruct-typo"
    cfg["datasets"][1]["source"] = {"format": "messages", "hub": "HuggingFaceH4/no_robot"}
    path = Path(cfg["run_dir"]).parent / "hub.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_misspelt_hub_id_is_refused_offline_naming_the_fetch_command(make_config,
                                                                       monkeypatch):
    """Offline (HF_HUB_OFFLINE), a hub id not in the local cache is an error for `validate`
    as for every stage, one line each for the model and a hub dataset, with the command that
    fetches it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _misspelt_hub_ids(make_config)
    code, errors = _validate(path)
    assert code == 2 and len(errors) == 2, errors
    assert "model.base: meta-llama/Llama-3-8B-Instruct-typo: not in the local hub cache" in \
        errors[0] and "`hf download meta-llama/Llama-3-8B-Instruct-typo`" in errors[0]
    assert "datasets.1.source.hub: HuggingFaceH4/no_robot" in errors[1]
    assert "`hf download HuggingFaceH4/no_robot --repo-type dataset`" in errors[1]
    result = runner.invoke(app, ["curate", str(path)])  # a stage refuses it too
    assert result.exit_code == 2 and "not in the local hub cache" in result.output


def test_a_misspelt_hub_id_is_refused_online(make_config, monkeypatch):
    """Online, `validate` asks the hub (with the user's token) and names an id it does not
    know; an unreachable hub is a note, not an error."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(self, repo_id, **kwargs):
        exc = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(exc, f"404 {repo_id}")
        raise exc

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(HfApi, "model_info", not_found)
    monkeypatch.setattr(HfApi, "dataset_info", not_found)
    path = _misspelt_hub_ids(make_config)
    code, errors = _validate(path)
    assert code == 2 and len(errors) == 2, errors
    assert "model.base: meta-llama/Llama-3-8B-Instruct-typo: no such model on the Hugging " \
        "Face hub" in errors[0]
    assert "datasets.1.source.hub: HuggingFaceH4/no_robot: no such dataset" in errors[1]

    def unreachable(self, repo_id, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and "could not ask the hub" in result.output


def test_a_folder_as_a_source_file_is_refused(make_config, tmp_path):
    cfg = yaml.safe_load(make_config().read_text())
    cfg["datasets"][0]["source"]["path"] = str(tmp_path)
    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, errors = _validate(path)
    assert code == 2 and errors == [f"error: {path}: datasets.0.source.path: {tmp_path}: is a "
                                    "folder; name a file"], errors


def test_strict_mode_reports_every_bad_row_after_a_good_first_one(make_config, tmp_path):
    """curate.strict stops at the first malformed row: validate names each of them (within the
    rows it reads), where the lenient mode passes a file whose first row reads."""
    rows = [{"instruction": "Say hi", "input": "", "output": "Hello!"}]
    lines = [json.dumps(r) for r in rows] + ['{"instruction": "x"', "[1, 2]", "not json",
                                             '{"instruction": "a", "output": 3}', "{bad"]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = yaml.safe_load(make_config().read_text())
    cfg["datasets"][1]["source"] = {"format": "alpaca", "path": str(data)}
    for strict, expected in ((False, 0), (True, 5)):
        cfg["curate"] = {"strict": strict}
        path = tmp_path / f"strict-{strict}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        code, errors = _validate(path)
        assert len(errors) == expected, errors
        assert code == (2 if expected else 0)
    assert [e.split(f"{data}:")[1].split(":")[0] for e in errors] == ["2", "3", "4", "5", "6"]


def test_an_axolotl_config_gets_the_hint_first_and_each_key_mapped(tmp_path):
    path = tmp_path / "axolotl.yaml"
    path.write_text(yaml.safe_dump({
        "base_model": "meta-llama/Llama-2-7b-hf", "load_in_4bit": True, "adapter": "qlora",
        "datasets": [{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}],
        "lora_r": 32, "learning_rate": 0.0002, "micro_batch_size": 2, "sequence_len": 2048,
        "num_epochs": 3, "output_dir": "./outputs"}, sort_keys=False))
    code, errors = _validate(path)
    assert code == 2 and not (tmp_path / "outputs").exists()
    assert "this looks like an axolotl config" in errors[0]
    for key, target in (("base_model", "model.base"), ("sequence_len", "model.max_input_len"),
                        ("lora_r", "training.lora.r"), ("num_epochs", "training.epochs"),
                        ("learning_rate", "training.learning_rate"),
                        ("micro_batch_size", "training.micro_batch_size"),
                        ("output_dir", "run_dir")):
        assert f"{key} -> {target}" in errors[0]
        assert any(f"{key}: unknown key (in fashionfuse: {target})" in e for e in errors), key
    assert "Value error" not in "\n".join(errors)


def test_a_llama_factory_config_gets_the_hint_first_and_each_key_mapped(tmp_path):
    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "stage": "sft",
        "do_train": True, "finetuning_type": "lora", "dataset": "alpaca_en_demo",
        "template": "llama3", "cutoff_len": 2048, "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 8, "learning_rate": 1e-4, "num_train_epochs": 3.0,
        "lora_rank": 8, "output_dir": "saves/x"}, sort_keys=False))
    code, errors = _validate(path)
    assert code == 2 and "this looks like a LLaMA-Factory config" in errors[0]
    for key, target in (("model_name_or_path", "model.base"),
                        ("cutoff_len", "model.max_input_len"), ("lora_rank", "training.lora.r"),
                        ("per_device_train_batch_size", "training.micro_batch_size"),
                        ("num_train_epochs", "training.epochs"), ("template",
                                                                  "model.chat_template")):
        assert f"{key} -> {target}" in errors[0], key
    assert any("do_train: unknown key (the train-adapter command)" in e for e in errors)


def test_errors_in_plain_words_and_set_options_blamed_on_themselves(make_config):
    """No pydantic prefixes, the value shown once, and a bad `--set` named as such."""
    path = make_config()
    result = runner.invoke(app, ["validate", str(path), "--set", "training.lr=0.1",
                                 "--set", "search.method=bayes"])
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert result.exit_code == 2
    assert "error: --set training.lr=0.1: training.lr: unknown key (in fashionfuse: " \
        "training.learning_rate)" in errors
    assert any(e.startswith("error: --set search.method=bayes: search.method: unknown method "
                            "'bayes'") for e in errors), errors
    assert not any("Value error" in e or "(got 'bayes')" in e for e in errors), errors


def test_a_duplicate_name_does_not_hide_the_other_problems(make_config, tmp_path):
    cfg = yaml.safe_load(make_config().read_text())
    cfg["datasets"][1]["name"] = cfg["datasets"][0]["name"]
    (tmp_path / "afile").write_text("x")
    cfg["run_dir"] = str(tmp_path / "afile")
    (tmp_path / "empty").mkdir()
    cfg["model"]["base"] = str(tmp_path / "empty")
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, errors = _validate(path)
    text = "\n".join(errors)
    assert code == 2 and "duplicate names" in text and "<root>" not in text
    assert "run_dir: " in text and "exists and is not a folder" in text
    assert "local folder without config.json or a tokenizer" in text


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


def test_the_examples_validate_offline(monkeypatch):
    """examples/: a Llama 3, a Qwen2.5 and a Mistral config, validated (nothing downloaded) as
    on a machine where their hub ids were fetched."""
    from fashionfuse import hub_ids

    monkeypatch.setattr(hub_ids, "is_cached", lambda ref: True)
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
