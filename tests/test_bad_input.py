"""Bad input loses nothing: malformed data rows are counted with file and line (or fail fast in
strict mode), bad configs are one clear line naming the field with nothing written."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from fashionfuse.cli import app

runner = CliRunner()


def _good(i: int) -> dict:
    return {"id": f"g{i}", "model": "gpt-4", "conversations": [
        {"from": "human", "value": f"question number {i}?"},
        {"from": "gpt", "value": f"answer number {i}."}]}


def _line(row) -> bytes:
    return (json.dumps(row) + "\n").encode()


# name -> (bytes of a ShareGPT .jsonl file, how many good rows it holds, malformed rows)
MALFORMED = {
    "truncated_json": (_line(_good(0)) + b'{"id": "t", "conversations": [{"from": "human"\n'
                       + _line(_good(1)), 2, 1),
    "wrong_types": (_line(_good(0)) + _line({"id": "w", "conversations": "hello"})
                    + _line({"id": "v", "conversations": [{"from": "human", "value": 7}]})
                    + _line([1, 2, 3]) + _line(_good(1)), 2, 3),
    "empty_conversation": (_line({"id": "e", "conversations": []}) + _line(_good(0)), 1, 1),
    "roles_out_of_order": (_line({"id": "o", "model": "gpt-4", "conversations": [
        {"from": "gpt", "value": "answer first"}, {"from": "human", "value": "then a question"}]})
        + _line(_good(0)), 1, 0),
    "invalid_utf8": (_line(_good(0)) + b'{"id": "u", "conversations": "\xff\xfe bad"}\n'
                     + _line(_good(1)), 2, 1),
    "bom": (b"\xef\xbb\xbf" + _line(_good(0)) + _line(_good(1)), 2, 0),
    "crlf": (_line(_good(0)).replace(b"\n", b"\r\n") + _line(_good(1)).replace(b"\n", b"\r\n"),
             2, 0),
    "blank_lines": (b"\n\n" + _line(_good(0)) + b"   \n" + _line(_good(1)), 2, 0),
    "huge_record": (_line({"id": "h", "model": "gpt-4", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "x " * 25_000_000}]})
        + _line(_good(0)), 1, 0),
}


def _config(tmp_path, data_file, strict=False) -> str:
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"base": "unused", "max_input_len": 256},
           "datasets": [{"name": "chat", "kind": "chat",
                         "source": {"format": "sharegpt", "path": str(data_file)}}],
           "curate": {"strict": strict, "num_proc": 1}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_data_is_counted_with_file_and_line(case, tmp_path, tiny_model):
    raw, good, malformed = MALFORMED[case]
    data = tmp_path / "chat.jsonl"
    data.write_bytes(raw)
    path = _config(tmp_path, data)
    result = runner.invoke(app, ["curate", path, "--set", f"model.base={tiny_model}"])
    assert result.exit_code == 0, (result.output, result.exception)
    out = tmp_path / "run" / "curate" / "chat"
    stats = json.loads((out / "stats.json").read_text())
    kept = sum(1 for _ in (out / "train.jsonl").read_text().splitlines()) + \
        sum(1 for _ in (out / "validation.jsonl").read_text().splitlines())
    assert kept == good
    assert stats["funnel"].get("malformed", 0) == malformed
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    bad = [r for r in rejects if r["filter"] == "malformed"]
    assert len(bad) == malformed and all(r["where"].startswith(f"{data}:") for r in bad)
    # every row read is either kept or rejected for a reason
    assert stats["funnel"].get("read", 0) == kept + len(rejects)


@pytest.mark.parametrize("case", ["truncated_json", "invalid_utf8", "wrong_types"])
def test_strict_mode_fails_fast_naming_file_and_line(case, tmp_path, tiny_model):
    data = tmp_path / "chat.jsonl"
    data.write_bytes(MALFORMED[case][0])
    path = _config(tmp_path, data, strict=True)
    result = runner.invoke(app, ["curate", path, "--set", f"model.base={tiny_model}"])
    assert result.exit_code == 2
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert f"{data}:2" in lines[0]  # the first bad row first (strict: every one is named)
    assert len(lines) == MALFORMED[case][2]  # the rows the lenient mode rejects
    assert not (tmp_path / "run" / "curate" / "chat").exists()


@pytest.mark.parametrize("command", ["validate", "curate"])
def test_a_source_with_no_readable_row_is_refused_before_any_work(command, tmp_path, tiny_model):
    """An empty file, or a JSON array that cannot be parsed, has no row to curate: one line
    naming the file (and line), exit 2, nothing written."""
    empty = tmp_path / "chat.jsonl"
    empty.write_bytes(b"")
    broken = tmp_path / "alpaca.json"
    broken.write_text('[{"instruction": "a", "output": "b"}, {"instruction": ')
    cfg = yaml.safe_load(open(_config(tmp_path, empty)))
    cfg["datasets"].append({"name": "qa", "kind": "qa",
                            "source": {"format": "alpaca", "path": str(broken)}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, [command, str(tmp_path / "c.yaml"), "--set",
                                 f"model.base={tiny_model}"])
    assert result.exit_code == 2, result.output
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(errors) == (3 if command == "validate" else 2), result.output  # + no eval task
    assert f"datasets.0.source: {empty}: no rows" in errors[0]
    assert f"datasets.1.source: {broken}:1: invalid JSON" in errors[1]
    assert not (tmp_path / "run").exists()


# (case, change to the valid config or raw YAML text, text the error line must contain)
BAD_CONFIGS = [
    ("unknown_top_key", {"colour": "red"}, "colour: unknown key"),
    ("unknown_nested_key", {"training.lora.rnak": 3}, "training.lora.rnak: unknown key"),
    ("wrong_type", {"training.batch_size": "big"}, "training.batch_size"),
    ("negative_lr", {"training.learning_rate": -1}, "training.learning_rate"),
    ("missing_base", {"model": {}}, "model.base: Field required"),
    ("missing_datasets", {"datasets": None}, "datasets"),
    ("empty_datasets", {"datasets": []}, "at least one dataset"),
    ("name_with_dotdot", {"datasets.0.name": "../up"}, "datasets.0.name"),
    ("name_with_slash", {"datasets.0.name": "a/b"}, "datasets.0.name"),
    ("duplicate_names", {"datasets.1.name": "chat"}, "duplicate names ['chat']"),
    ("reserved_name", {"datasets.0.name": "fused"}, "datasets.0.name"),
    ("path_and_hub", {"datasets.0.source.hub": "org/data"}, "datasets.0.source"),
    ("neither_path_nor_hub", {"datasets.0.source.path": None}, "datasets.0.source"),
    ("missing_source_file", {"datasets.0.source.path": "/no/such.jsonl"},
     "datasets.0.source.path: /no/such.jsonl: not found"),
    ("unknown_format", {"datasets.0.source.format": "csvish"}, "datasets.0.source.format"),
    ("high_below_low", {"search.low": 1, "search.high": 0.5}, "high must be greater than low"),
    ("empty_grid", {"search.grid_values": []}, "grid_values must not be empty"),
    ("bad_halving", {"search.halving_fractions": [0.5, 0.8]}, "halving_fractions"),
    ("unknown_search_adapter", {"search.adapters": ["nope"]}, "search.adapters: unknown names"),
    ("lm_eval_without_tasks", {"search.objective.type": "lm_eval"}, "needs tasks"),
    ("retention_on_val_loss", {"search.objective.retention": {"tasks": ["x"]}},
     "search.objective: retention: a term of the lm_eval and mix objectives"),
    ("data_without_preset", {"eval.benchmark_data": "/tmp"}, "only used with a preset"),
    ("validation_fraction_out_of_range", {"datasets.0.validation_fraction": 1.5},
     "datasets.0.validation_fraction"),
    ("weight_out_of_range", {"search.objective.mix_weight": 2}, "search.objective.mix_weight"),
    ("negative_dataset_weight", {"search.objective.dataset_weights": {"chat": -1}},
     "search.objective.dataset_weights"),
    ("unknown_method", {"search.method": "annealing"}, "unknown method 'annealing'"),
    ("unknown_objective", {"search.objective.type": "vibes"}, "unknown objective 'vibes'"),
    ("bits_8", {"model.quantization.bits": 8}, "model.quantization.bits"),
    ("rounds_and_search_adapters", {"rounds": [{"adapters": ["chat"]}], "search.adapters": ["chat"]},
     "not used with rounds"),
    ("on_top_of_unknown", {"adapters": [{"name": "x", "datasets": ["chat"], "on_top_of": ["y"]}]},
     "adapters.0.on_top_of"),
    ("missing_include_path", {"eval.include_paths": ["/no/tasks"]},
     "eval.include_paths.0: /no/tasks: folder not found"),
    ("step_not_dividing", {"search.method": "random", "search.step": 0.3}, "must divide"),
    ("invalid_yaml", "run_dir: [unclosed\n", "invalid YAML"),
    ("top_level_list", "- a\n- b\n", "top level must be a mapping"),
    ("run_dir_is_a_file", {"run_dir": "@file"}, "run_dir: "),
]


def _set(data: dict, dotted: str, value) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is None:
        node.pop(last, None)
    else:
        node[last] = value


@pytest.mark.parametrize("case,change,expected", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_field_and_writes_nothing(
        case, change, expected, make_config, tmp_path):
    run_dir = tmp_path / "run"
    path = tmp_path / "bad.yaml"
    if isinstance(change, str):
        path.write_text(change)
    else:
        data = yaml.safe_load(make_config(run_dir=run_dir).read_text())
        for key, value in change.items():
            if value == "@file":
                (tmp_path / "afile").write_text("x")
                value = str(tmp_path / "afile")
            _set(data, key, value)
        path.write_text(yaml.safe_dump(data))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, ["curate", str(path)])
    assert result.exit_code == 2, (result.output, result.exception)
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], errors
    assert str(path) in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert not run_dir.exists()
