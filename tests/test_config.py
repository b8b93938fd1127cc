"""Config validation: strict keys, typed fields, clear one-line errors, overrides."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from fashionfuse.cli import app
from fashionfuse.config import ConfigError, load_config

runner = CliRunner()


def _errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_valid_config_loads_with_table4_defaults(make_config):
    cfg = load_config(make_config())
    assert cfg.model.quantization.bits == 4 and cfg.model.quantization.double_quant
    assert cfg.training.lr_scheduler == "constant_with_warmup"
    assert cfg.training.warmup_ratio == 0.1
    assert cfg.training.lora.target_modules == "all-linear"  # = Table 4's list on Llama


def test_unknown_key_is_one_line_naming_the_field(make_config):
    path = make_config(training={"lora": {"r": 4, "alpha": 8, "rnak": 3}})
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    errors = _errors(result)
    assert len(errors) == 1
    assert "training.lora.rnak: unknown key" in errors[0] and str(path) in errors[0]


def test_wrong_type_names_field_and_value(make_config):
    result = runner.invoke(app, ["curate", str(make_config()), "--set", "training.micro_batch_size=many"])
    assert result.exit_code == 2
    (line,) = _errors(result)
    assert "training.micro_batch_size" in line and "'many'" in line


def test_missing_config_file(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    (line,) = _errors(result)
    assert "nope.yaml: config file not found" in line


def test_validate_reports_every_problem_at_once(make_config):
    result = runner.invoke(app, ["validate", str(make_config()), "--set", "seed=x",
                                 "--set", "search.method=annealing", "--set", "bogus=1"])
    errors = _errors(result)
    assert result.exit_code == 2 and len(errors) == 3
    assert any("seed" in e for e in errors) and any("search.method" in e for e in errors)
    assert any("bogus: unknown key" in e for e in errors)


def test_validate_reports_missing_source_file(make_config):
    result = runner.invoke(app, ["validate", str(make_config()),
                                 "--set", "datasets.0.source.path=/no/such.jsonl"])
    assert result.exit_code == 2
    assert "datasets.0.source.path: /no/such.jsonl: not found" in result.output


def test_overrides_reach_nested_fields_and_list_items(make_config):
    cfg = load_config(make_config(), ["run_dir=/tmp/x", "datasets.1.kind=chat",
                                      "search.grid_values=[0.25, 0.75]"])
    assert cfg.run_dir == "/tmp/x"
    assert cfg.datasets[1].kind == "chat"
    assert cfg.search.grid_values == [0.25, 0.75]


def test_bad_override_index_is_reported(make_config):
    with pytest.raises(ConfigError, match="no list item '5'"):
        load_config(make_config(), ["datasets.5.kind=qa"])


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run_dir: x\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(path)


def test_cross_field_checks(make_config):
    with pytest.raises(ConfigError, match="search.adapters: unknown names"):
        load_config(make_config(), ["search.adapters=[chat, nosuch]"])
    with pytest.raises(ConfigError, match="adapters.0.on_top_of: unknown or later adapters"):
        load_config(make_config(adapters=[{"name": "x", "datasets": ["chat"], "on_top_of": ["y"]}]))
    with pytest.raises(ConfigError, match="adapters.0.name: 'chat' is already an adapter name"):
        load_config(make_config(adapters=[{"name": "chat", "datasets": ["orca"]}]))
    with pytest.raises(ConfigError, match="rounds.1.adapters: unknown names"):
        load_config(make_config(rounds=[{"adapters": ["chat"]}, {"adapters": ["nosuch"]}]))


def test_resolved_config_saved_in_run_dir(make_config, tmp_path):
    path = make_config()
    result = runner.invoke(app, ["curate", str(path)])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())
    assert saved["training"]["lora"]["r"] == 4 and saved["seed"] == 7


@pytest.mark.parametrize("name", ["base", "fused", "merged", "Base"])
def test_reserved_dataset_and_adapter_names_are_refused(make_config, name):
    """eval labels its rows base/fused/merged: an adapter of that name would collide."""
    with pytest.raises(ConfigError, match=f"datasets.0.name: .*'{name}' is reserved"):
        load_config(make_config(), [f"datasets.0.name={name}"])
    with pytest.raises(ConfigError, match=f"adapters.0.name: .*'{name}' is reserved"):
        load_config(make_config(adapters=[{"name": name, "datasets": ["chat"]}]))


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden"])
def test_adapter_names_must_be_plain_file_names(make_config, name):
    with pytest.raises(ConfigError, match="adapters.0.name: String should match pattern"):
        load_config(make_config(adapters=[{"name": name, "datasets": ["chat"]}]))


def test_search_step_must_divide_the_range(make_config):
    with pytest.raises(ConfigError, match="search: .*step 0.3 must divide high - low"):
        load_config(make_config(), ["search.method=tpe", "search.step=0.3"])


def test_real_model_configs_differ_only_where_the_hub_forces_them():
    """configs/smollm2-hub.yaml is configs/smollm2.yaml reading hub datasets: same model,
    sizes, training, search, eval limit and ablation."""
    from pathlib import Path

    from fashionfuse.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    local = load_config(root / "smollm2.yaml").model_dump(mode="json")
    hub = load_config(root / "smollm2-hub.yaml").model_dump(mode="json")
    for key in ("model", "training", "search", "ablate", "seed"):
        assert local[key] == hub[key], key
    assert {k: v for k, v in local["eval"].items() if k != "benchmark_data"} == \
        {k: v for k, v in hub["eval"].items() if k != "benchmark_data"}
    for a, b in zip(local["datasets"], hub["datasets"]):
        assert (a["name"], a["kind"], a["max_records"], a["test_fraction"]) == \
            (b["name"], b["kind"], b["max_records"], b["test_fraction"])
        assert a["source"]["path"] and b["source"]["hub"]


def test_operators_are_read_from_their_declarations():
    """search.operator accepts the operators fusion declares, and says which when it refuses;
    an operator's other hyper-parameters are checked against its declaration and domain."""
    import pytest
    from pydantic import ValidationError

    from fashionfuse.config import SearchConfig
    from fashionfuse.fusion import DENSE_OPERATORS, OPERATORS

    for name in OPERATORS:
        assert SearchConfig(operator=name).operator == name
    with pytest.raises(ValidationError, match="known: sum, ties, dare, magnitude, della"):
        SearchConfig(operator="slerp")
    assert DENSE_OPERATORS == ("ties", "dare", "magnitude", "della", "breadcrumbs",
                               "knots_ties", "knots_dare")
    assert all(OPERATORS[n].params["density"] == 0.5 for n in DENSE_OPERATORS)
    della = SearchConfig(operator="della", density=[0.4, 0.6], operator_params={"epsilon": [0.05, 0.2]})
    assert della.searched_params() == {"density": [0.4, 0.6], "epsilon": [0.05, 0.2]}
    assert SearchConfig(operator="della").fixed_operator_params() == {"epsilon": 0.1}
    assert SearchConfig(operator="breadcrumbs", operator_params={"gamma": 0.05}
                        ).searched_params() == {}
    with pytest.raises(ValidationError, match="della has no parameter 'gamma'"):
        SearchConfig(operator="della", operator_params={"gamma": 0.1})
    with pytest.raises(ValidationError, match=r"density 0.9 \+- epsilon 0.2"):
        SearchConfig(operator="della", density=[0.5, 0.9], operator_params={"epsilon": 0.2})


def test_overrides_reach_list_items_by_name(make_config):
    from fashionfuse.config import ConfigError, load_config

    cfg = load_config(make_config(), ["datasets.orca.max_records=5", "datasets.0.max_records=7"])
    assert cfg.dataset("orca").max_records == 5 and cfg.dataset("chat").max_records == 7
    with pytest.raises(ConfigError, match=r"no list item 'nope' at datasets \(names: \['chat', 'orca'\]\)"):
        load_config(make_config(), ["datasets.nope.max_records=5"])


def test_version_flag():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fashionfuse {version('fashionfuse')}"


def test_console_options_may_follow_the_command():
    from fashionfuse.cli import console_options_first

    assert console_options_first(["validate", "x.yaml", "-v", "--log-format", "json"]) == \
        ["-v", "--log-format", "json", "validate", "x.yaml"]
    assert console_options_first(["run", "x.yaml", "--set", "a=-q", "-q"]) == \
        ["-q", "run", "x.yaml", "--set", "a=-q"]


def test_help_names_every_ablate_variant_and_leaks_no_types():
    from fashionfuse.config import ABLATION_VARIANTS

    text = runner.invoke(app, ["ablate", "--help"], terminal_width=200).output
    assert all(v in text for v in ABLATION_VARIANTS)
    for command in ("eval", "run", "train-adapter", "search-weights", "report"):
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        assert "<bool>" not in text and "<list" not in text and "<float>" not in text, text
