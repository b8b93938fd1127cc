"""Beyond Llama: tiny random models of other architectures (built offline from transformers'
config classes) train packed exactly, carry LoRA on every linear layer, and run the pipeline."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fashionfuse.architectures import (
    ArchitectureError,
    check_tokenizer_fits,
    linear_module_names,
    resolve_lora_targets,
)
from fashionfuse.cli import app
from fashionfuse.train.varlen_attention import NAME, use_varlen_attention

from .conftest import config_dict
from .tiny_archs import ARCHS, save_tiny_model, tiny_model

runner = CliRunner()
LINEAR_KINDS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "gpt_oss": {"q_proj", "k_proj", "v_proj", "o_proj"},  # experts are 3-D tensors, not Linear
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_packed_logits_equal_each_example_alone(arch):
    """Two examples (40 and 50 tokens, longer than the 32-token windows) packed in one row give
    the logits each gets alone through the model's own attention (float32, <= 1e-4)."""
    torch.manual_seed(1)
    a, b = torch.randint(3, 500, (40,)), torch.randint(3, 500, (50,))
    model = tiny_model(arch)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=x[None], use_cache=False).logits[0] for x in (a, b)])
        assert use_varlen_attention(model) == NAME
        packed = model(input_ids=torch.cat([a, b])[None], use_cache=False,
                       position_ids=torch.cat([torch.arange(40), torch.arange(50)])[None]).logits[0]
    assert float((packed - alone).abs().max()) <= 1e-4


def test_unsupported_attention_turns_packing_off_and_says_so(monkeypatch):
    """Something the packed path does not implement (here: a mask) is never run packed."""
    from fashionfuse.train import varlen_attention

    model = tiny_model("llama")
    real = varlen_attention._check_supported
    monkeypatch.setattr(varlen_attention, "_check_supported",
                        lambda m, mask, kw: real(m, torch.ones(1), kw))
    said = []
    assert use_varlen_attention(model, log=said.append) is None
    assert len(said) == 1 and "packing off" in said[0] and "attention mask" in said[0]
    assert model.config._attn_implementation != NAME


@pytest.mark.parametrize("arch", list(ARCHS))
def test_all_linear_resolves_every_linear_kind_of_the_blocks(arch):
    model = tiny_model(arch)
    targets = resolve_lora_targets(model, "all-linear")
    assert "lm_head" not in targets
    if arch in LINEAR_KINDS:
        assert set(targets) == LINEAR_KINDS[arch]
    elif arch not in LINEAR_KINDS:
        assert set(targets) == LINEAR_KINDS["llama"]


def test_explicit_targets_that_match_nothing_list_the_real_names():
    model = tiny_model("phi3")
    with pytest.raises(ArchitectureError, match=r"\['q_proj', 'k_proj'\] match no linear layer.*"
                                                r"'gate_up_proj'.*'qkv_proj'"):
        resolve_lora_targets(model, ["q_proj", "k_proj", "o_proj"])
    assert resolve_lora_targets(model, ["qkv_proj"]) == ["qkv_proj"]


def test_tokenizer_checks(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    small = tiny_model_of_vocab(len(tok) - 10)
    with pytest.raises(ArchitectureError, match=f"{len(tok)} tokens but the model's embedding "
                                                f"has {len(tok) - 10} rows"):
        check_tokenizer_fits(small, tok)
    fits = tiny_model_of_vocab(len(tok))
    check_tokenizer_fits(fits, tok)
    tok.eos_token = None
    with pytest.raises(ArchitectureError, match="EOS token None"):
        check_tokenizer_fits(fits, tok)


def tiny_model_of_vocab(vocab: int):
    from .tiny_archs import tiny_model as build

    return build("llama", vocab_size=vocab)


def test_tokenizer_larger_than_embeddings_is_one_line_at_training(make_config, tmp_path, tiny_model):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "small-vocab"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tiny_model_of_vocab(len(tok) - 10).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    path = make_config(model={"base": str(model_dir), "max_input_len": 128})
    assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
    result = runner.invoke(app, ["train-adapter", str(path)])
    assert result.exit_code == 2
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert "tokens but the model's embedding has" in line


@pytest.mark.parametrize("arch", list(ARCHS))
def test_pipeline_runs_on_other_architectures(arch, tiny_model, demo_data, tmp_path):
    """curate -> train (packed, 4-bit) -> exact fusion search -> eval through the CLI."""
    from fashionfuse.adapters.saved import load_saved_adapter, weighted_delta

    model_dir = save_tiny_model(arch, tiny_model, tmp_path / arch)
    cfg = config_dict(tmp_path / "run", model_dir, demo_data)
    cfg["datasets"][0]["max_records"] = cfg["datasets"][1]["max_records"] = 30
    cfg["training"].update(max_steps=2)
    cfg["eval"].update(tasks=["demo_colours"], limit=4)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for stage in ("curate", "train-adapter", "search-weights", "eval"):
        result = runner.invoke(app, [stage, str(path)])
        assert result.exit_code == 0, f"{arch} {stage}: {result.output}\n{result.exception!r}"
    run = tmp_path / "run"
    manifest = json.loads((run / "adapters" / "chat" / "manifest.json").read_text())
    kinds = set(manifest["metrics"]["target_modules"])
    assert kinds == LINEAR_KINDS.get(arch, LINEAR_KINDS["llama"])
    assert manifest["metrics"]["attention"] == NAME
    saved = load_saved_adapter(run / "adapters" / "chat")
    assert {m.rsplit(".", 1)[-1] for m in saved.modules} == kinds  # every kind, every block
    from transformers import AutoModelForCausalLM

    n_linear = sum(len(v) for v in linear_module_names(AutoModelForCausalLM.from_pretrained(model_dir)).values())
    assert len(saved.modules) == n_linear
    best = json.loads((run / "search" / "best.json").read_text())
    names = best["adapters"]
    want = weighted_delta([load_saved_adapter(run / "adapters" / n) for n in names],
                          [best["best_weights"][n] for n in names])
    got = weighted_delta([load_saved_adapter(run / "search" / "fused")], [1.0])
    for mod in want:
        torch.testing.assert_close(got[mod], want[mod], rtol=1e-5, atol=1e-7)
    table = json.loads((run / "eval" / "table.json").read_text())
    assert [r["model"] for r in table["rows"]] == ["base", "adapter:chat", "adapter:orca", "fused"]
