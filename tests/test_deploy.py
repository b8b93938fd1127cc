"""`fashionfuse export`: the GGUF LoRA in llama.cpp's format (names, scales, q/k row order), the
vLLM-ready adapter (rank cap by SVD, vLLM's rules), clear refusals; and, `-m slow`, the GGUF
LoRA run in llama.cpp itself against the PEFT adapter in transformers on SmolLM2's GGUF file."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fashionfuse.adapters.saved import load_saved_adapter, task_delta
from fashionfuse.cli import app
from fashionfuse.deploy.gguf_lora import ExportError, gguf_architecture, permute_rows
from fashionfuse.deploy.vllm import serving_rank, vllm_violations

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def exported_run(pipeline_run, tmp_path):
    """A copy of the pipeline's run (trained adapters, search, fused adapter) to export from."""
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns("eval", "*.lock"))
    data = yaml.safe_load(pipeline_run["config"].read_text())
    data["run_dir"] = str(run)

    def config(**export) -> Path:
        path = tmp_path / f"export-{len(list(tmp_path.glob('export-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump({**data, "export": export}))
        return path
    return run, config


def _read_gguf(path: Path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {}
    for name, field in reader.fields.items():
        value = field.parts[field.data[0]] if field.data else None
        fields[name] = bytes(value).decode() if field.types and field.types[0] == \
            gguf.GGUFValueType.STRING else (value.tolist()[0] if value is not None else None)
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)])
               for t in reader.tensors}
    return fields, tensors


def test_q_k_row_permutation_is_what_transformers_undoes():
    """GGUF's Llama q/k row order: transformers' own GGUF reader undoes our permutation."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = torch.randn(9 * 64, 8, dtype=torch.float64)
    undo = LlamaTensorProcessor(config={})._reverse_permute_weights
    assert np.array_equal(undo(permute_rows(weight, 9).numpy(), 9, 9), weight.numpy())
    kv = torch.randn(3 * 64, 8, dtype=torch.float64)
    assert np.array_equal(undo(permute_rows(kv, 3).numpy(), 9, 3), kv.numpy())
    assert not torch.equal(permute_rows(weight, 9), weight)


def test_export_writes_llama_cpp_lora_and_vllm_adapter(exported_run):
    """GGUF: llama.cpp's adapter keys, one lora_a/lora_b pair per module named by the gguf
    package's map, A as saved, B times the PEFT scale (q/k rows permuted), alpha = rank; one
    file per trained adapter with its searched weight. vLLM: capped at max_rank by SVD, its
    error the discarded singular values', refused nothing by vLLM's rules."""
    run, config = exported_run
    result = runner.invoke(app, ["export", str(config(max_rank=4))])
    assert result.exit_code == 0, result.output
    fused = load_saved_adapter(run / "search" / "fused")
    fields, tensors = _read_gguf(run / "export" / "fused.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == fused.config["r"]
    assert len(tensors) == 2 * len(fused.modules)
    base_config = json.loads((Path(fused.config["base_model_name_or_path"]) / "config.json")
                             .read_text())
    heads = {"q_proj": base_config["num_attention_heads"],
             "k_proj": base_config["num_key_value_heads"]}
    for module in fused.modules:
        layer, kind = module.split(".layers.")[1].split(".")[0], module.rsplit(".", 1)[1]
        name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj":
                "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                "down_proj": "ffn_down"}[kind]
        a = tensors[f"blk.{layer}.{name}.weight.lora_a"]
        b = torch.from_numpy(tensors[f"blk.{layer}.{name}.weight.lora_b"].copy())
        assert np.array_equal(a, fused.lora_a[module].numpy())
        expected = fused.lora_b[module] * fused.scale
        if kind in heads:  # llama.cpp's rotary row order
            expected = permute_rows(expected, heads[kind])
        torch.testing.assert_close(b, expected, rtol=0, atol=0)
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    best = json.loads((run / "search" / "best.json").read_text())["best_weights"]
    parts = manifest["metrics"]["gguf_lora"]["parts"]
    assert {k: v["scale"] for k, v in parts.items()} == best
    assert all(Path(p["file"]).is_file() for p in parts.values())
    flag = manifest["metrics"]["gguf_lora"]["lora_scaled"].split(" ", 1)[1]
    assert _llama_cpp_lora_scaled(flag) == [(p["file"], p["scale"]) for p in parts.values()]

    vllm = manifest["metrics"]["vllm"]
    assert fused.config["r"] > 4 and vllm["rank"] == 4 and not vllm["exact"]
    deltas = {m: task_delta(fused, m) for m in fused.modules}
    lost = total = 0.0
    for d in deltas.values():
        s = torch.linalg.svdvals(d)
        lost, total = lost + float((s[4:] ** 2).sum()), total + float((s ** 2).sum())
    assert vllm["relative_error"] == pytest.approx(math.sqrt(lost / total), rel=1e-6)
    assert vllm["check"]["problems"] == [] and "--max-lora-rank 8" in vllm["serve"]
    served = load_saved_adapter(run / "export" / "vllm")
    assert served.config["r"] == 4 and not served.config.get("modules_to_save")


def test_vllm_export_is_exact_when_the_rank_fits(exported_run):
    run, config = exported_run
    assert runner.invoke(app, ["export", str(config(formats=["vllm"]))]).exit_code == 0
    fused, served = (load_saved_adapter(run / p) for p in ("search/fused", "export/vllm"))
    for m in fused.modules:
        assert torch.equal(task_delta(fused, m), task_delta(served, m))


def test_vllm_rules():
    ok = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "bias": "none"}
    names = ["x.lora_A.weight", "x.lora_B.weight"]
    assert vllm_violations(ok, names, 16) == []
    assert serving_rank(12) == 16 and serving_rank(300) == 320
    bad = {**ok, "modules_to_save": ["lm_head"], "use_dora": True, "bias": "all", "r": 64}
    problems = vllm_violations(bad, [*names, "lm_head.weight"], 24)
    assert len(problems) == 6, problems


def test_unmapped_architecture_and_missing_converter_are_one_line(exported_run):
    with pytest.raises(ExportError, match="architecture 'gpt_neox' is not mapped"):
        gguf_architecture("gpt_neox")
    _, config = exported_run
    result = runner.invoke(app, ["export", str(config(formats=["merged_gguf"]))],
                           env={"LLAMA_CPP_DIR": ""})
    assert result.exit_code == 2
    assert "LLAMA_CPP_DIR" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["export", str(config(adapter="nowhere"))])
    assert result.exit_code == 2 and "export.adapter: nowhere: no adapter" in result.output


def _llama_cpp_or_skip():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pytest.skip("needs llama-cpp-python: python scripts/build_llama_cpp.py (compiles "
                    "llama.cpp; needs a C/C++ compiler and cmake)")


def _smollm2_or_skip() -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    from fetch_smollm2 import fetch_gguf

    try:
        return Path(fetch_gguf())
    except SystemExit as exc:
        pytest.skip(f"needs SmolLM2's GGUF file: {exc}")


@pytest.mark.slow
def test_gguf_lora_in_llama_cpp_moves_log_probabilities_as_peft_does(tmp_path):
    """SmolLM2-135M-Instruct's own Q4_1 file in llama.cpp with our GGUF LoRA vs the same file
    dequantised in transformers with the PEFT adapter (random rank 8 on every projection):
    the effects agree; the same file at scale 0 or 2 (a dropped or mis-scaled adapter) and an
    export without the q/k row permutation do not."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fashionfuse.config import ModelConfig
    from fashionfuse.deploy import gguf_lora
    from fashionfuse.deploy.runtime_check import check_gguf_lora
    from fashionfuse.gguf_base import checkpoint_dir

    _llama_cpp_or_skip()
    base_gguf = _smollm2_or_skip()
    checkpoint = checkpoint_dir(ModelConfig(base=str(base_gguf)))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    model.save_pretrained(tmp_path / "adapter")
    text = ("The capital of France is Paris. Two plus two equals four, and the sky is blue on a "
            "clear day. Water boils at one hundred degrees Celsius at sea level.")
    tokens = AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"]
    config = gguf_lora.model_config_of(checkpoint)
    gguf_lora.write_gguf_lora(tmp_path / "adapter", config, tmp_path / "lora.gguf")
    right = check_gguf_lora(base_gguf, tmp_path / "lora.gguf", checkpoint, tmp_path / "adapter",
                            tokens)
    assert right["matches"], right
    for scale in (0.0, 2.0):
        wrong = check_gguf_lora(base_gguf, tmp_path / "lora.gguf", checkpoint,
                                tmp_path / "adapter", tokens, lora_scale=scale)
        assert not wrong["matches"], (scale, wrong)
    unpermuted = dict(gguf_lora.GGUF_ARCHITECTURES, llama=("llama", False))
    original = gguf_lora.GGUF_ARCHITECTURES
    gguf_lora.GGUF_ARCHITECTURES = unpermuted
    try:
        gguf_lora.write_gguf_lora(tmp_path / "adapter", config, tmp_path / "unpermuted.gguf")
    finally:
        gguf_lora.GGUF_ARCHITECTURES = original
    wrong = check_gguf_lora(base_gguf, tmp_path / "unpermuted.gguf", checkpoint,
                            tmp_path / "adapter", tokens)
    assert not wrong["matches"], wrong


@pytest.mark.slow
def test_merged_gguf_is_made_by_llama_cpp_and_runs_there(tmp_path):
    """base + adapter merged, converted by llama.cpp's own converter to q8_0 and loaded by
    llama.cpp: its next-token log-probabilities follow transformers' merged model (the two
    runtimes' usual disagreement aside) far closer than the unadapted base's do."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fashionfuse.deploy.runtime_check import (
        llama_cpp_token_logprobs,
        transformers_token_logprobs,
    )
    from fashionfuse.gguf_base import cache_root

    _llama_cpp_or_skip()
    tree = next((cache_root() / "llama-cpp").glob("llama.cpp-*"), None)
    if tree is None:
        pytest.skip("needs llama.cpp's converter: python scripts/build_llama_cpp.py")
    base_gguf = _smollm2_or_skip()
    from fashionfuse.config import ModelConfig
    from fashionfuse.gguf_base import checkpoint_dir

    checkpoint = checkpoint_dir(ModelConfig(base=str(base_gguf)))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    config = {"run_dir": str(tmp_path / "run"),
              "model": {"base": str(base_gguf), "quantization": {"bits": 16}},
              "datasets": [{"name": "chat", "kind": "chat",
                            "source": {"format": "sharegpt", "path": str(tmp_path / "no.jsonl")}}],
              "export": {"adapter": str(tmp_path / "adapter"), "formats": ["merged_gguf"],
                         "gguf_type": "q8_0", "llama_cpp_dir": str(tree)}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["export", str(tmp_path / "c.yaml")])
    assert result.exit_code == 0, result.output
    merged = tmp_path / "run" / "export" / "adapter-merged-q8_0.gguf"
    tokens = AutoTokenizer.from_pretrained(checkpoint)(
        "The capital of France is Paris. Two plus two equals four, and the sky is blue on a "
        "clear day. Water boils at one hundred degrees Celsius at sea level.")["input_ids"]
    cpp_merged = llama_cpp_token_logprobs(merged, tokens)
    hf_base, hf_merged = transformers_token_logprobs(checkpoint, tmp_path / "adapter", tokens)
    assert (hf_merged - hf_base).abs().max() > 1.0  # the adapter matters here
    assert (cpp_merged - hf_merged).abs().mean() < 0.5 * (cpp_merged - hf_base).abs().mean()


def test_the_check_needs_a_gguf_base(exported_run):
    """export.check runs llama.cpp on the base's GGUF file: with a plain checkpoint as the base
    it is refused in one line (the GGUF LoRA is already written)."""
    run, config = exported_run
    result = runner.invoke(app, ["export", str(config(formats=["gguf_lora"], check=True))])
    assert result.exit_code == 2 and "model.base must be a .gguf file" in result.output
    assert (run / "export" / "fused.gguf").is_file()


def _llama_cpp_lora_scaled(value: str) -> list[tuple[str, float]]:
    """How llama.cpp's common/arg.cpp reads `--lora-scaled VALUE` (the release
    scripts/build_llama_cpp.py builds): comma-separated items, each split on ':' into exactly
    FNAME and SCALE, else "lora-scaled format: FNAME:SCALE"."""
    out = []
    for item in value.split(","):
        parts = item.split(":")
        if len(parts) != 2:
            raise ValueError("lora-scaled format: FNAME:SCALE")
        out.append((parts[0], float(parts[1])))
    return out


def test_lora_scaled_flag_parses_as_llama_cpp_reads_it(tmp_path):
    from fashionfuse.deploy.pipeline import lora_scaled_flag
    from fashionfuse.errors import UserError

    files = {tmp_path / "parts" / "chat.gguf": 0.5, tmp_path / "parts" / "orca.gguf": 1.25}
    flag, value = lora_scaled_flag(files).split(" ", 1)
    assert flag == "--lora-scaled"
    assert _llama_cpp_lora_scaled(value) == [(str(p), w) for p, w in files.items()]
    with pytest.raises(UserError, match="':' or ','"):
        lora_scaled_flag({tmp_path / "a:b.gguf": 1.0})
