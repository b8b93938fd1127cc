"""The second correctness audit (issue 23): each defect found, reproduced on a tiny model.

1. the merged row is scored in the dtype it was exported in;
2. a rewritten `merged/` makes eval score again (its bytes are fingerprinted);
3. the 4-bit merged export re-quantises the base exactly as training did (fp16/bf16/fp32
   checkpoints);
4. `ablate` with a task objective gives the learned variants a differentiable objective, and
   refuses a variant that cannot run before any work;
5./7. `batch_size: auto` is found per row length and bounded by the memory available, without
   a trial forward on a CPU;
6. the trailing-logits wrapper scores rows that end in token 0 as plain HFLM does.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from fashionfuse.cli import app
from fashionfuse.config import load_config

runner = CliRunner()


def _copy_run(pipeline_run, tmp_path, *ignore):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run_dir"], run, ignore=shutil.ignore_patterns(*ignore))
    return run


# --------------------------------------------------------------------------- 1 and 2
def test_merged_row_is_scored_as_exported_and_again_when_the_export_changes(
        pipeline_run, tmp_path, monkeypatch):
    from fashionfuse.base_model import DTYPES, resolve_compute_dtype
    from fashionfuse.evaluate import harness

    run = _copy_run(pipeline_run, tmp_path, "search*", "eval*")
    cfg = str(pipeline_run["config"])
    compute = resolve_compute_dtype(load_config(cfg).model.quantization, "cpu")
    first, second = ("float32", "bfloat16") if compute != "float32" else ("bfloat16", "float32")
    scored = []
    wrap = harness.wrap_model
    monkeypatch.setattr(harness, "wrap_model",
                        lambda model, *a, **k: (scored.append(model.dtype), wrap(model, *a, **k))[1])
    base = ["--set", f"run_dir={run}"]
    for export in (first, second):
        res = runner.invoke(app, ["search-weights", cfg, *base, "--set", "search.export_merged=true",
                                  "--set", f"search.export_dtype={export}"])
        assert res.exit_code == 0, res.output
        report = json.loads((run / "search" / "merged" / "export_report.json").read_text())
        assert report["dtype"] == export
        res = runner.invoke(app, ["eval", cfg, *base, "--set", "eval.models=[merged]"])
        assert res.exit_code == 0, res.output
        assert "eval: up to date" not in res.output  # a new export is scored again
        assert scored[-1] == DTYPES[export]  # the model handed to lm-eval is the exported one
        manifest = json.loads((run / "eval" / "manifest.json").read_text())
        assert manifest["scored_weights"]["merged"] == export
    res = runner.invoke(app, ["eval", cfg, *base, "--set", "eval.models=[merged]"])
    assert "eval: up to date" in res.output


# --------------------------------------------------------------------------- 3
@pytest.mark.parametrize("stored", ["float16", "bfloat16", "float32"])
def test_merged_export_starts_from_the_nf4_codes_training_used(tiny_model, tmp_path,
                                                               monkeypatch, stored):
    """Training on a machine whose compute dtype resolves to bfloat16, exporting where `auto`
    would resolve to float32: the export reads the adapter manifest's quantisation record and
    its dequantised base equals the training model's, bit for bit."""
    import bitsandbytes as bnb

    from fashionfuse import base_model
    from fashionfuse.base_model import DTYPES, load_base_model, quantization_record
    from fashionfuse.config import ModelConfig
    from fashionfuse.fusion.export import export_merged_model
    from fashionfuse.rundir import write_manifest

    ckpt = tmp_path / stored
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=DTYPES[stored]).save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(ckpt)
    cfg = ModelConfig(base=str(ckpt))  # 4-bit, compute dtype auto
    monkeypatch.setattr(base_model, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    trained = load_base_model(cfg, device="cpu")
    record = quantization_record(trained)
    assert record["weight_dtype"] == "bfloat16" and record["quant_type"] == "nf4"
    expected = {name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                for name, m in trained.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert expected
    adapter = tmp_path / "adapter"  # what training leaves: the record in the manifest
    adapter.mkdir()
    write_manifest(adapter, stage="train", fingerprint="f", config_hash="c", inputs={}, seed=0,
                   extra={"quantization": record})
    monkeypatch.setattr(base_model, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    out = tmp_path / "merged"
    report = export_merged_model(cfg, adapter, out, torch.float32, deltas={})
    assert report["base_quantization"] == record
    saved = load_file(out / "model.safetensors")
    for name, weight in expected.items():
        assert torch.equal(saved[f"{name}.weight"], weight.reshape(saved[f"{name}.weight"].shape)), name


def test_training_records_how_its_base_was_quantised(pipeline_run):
    for name in ("chat", "orca"):
        manifest = json.loads((pipeline_run["run_dir"] / "adapters" / name / "manifest.json")
                              .read_text())
        record = manifest["quantization"]
        assert record["weight_dtype"] == manifest["metrics"]["compute_dtype"]
        assert record["quant_type"] == "nf4" and record["double_quant"] is True


def test_adapters_quantised_differently_are_not_merged_into_one_base():
    from fashionfuse.adapters.saved import FusionError
    from fashionfuse.fusion.export import trained_quantization

    same = {"weight_dtype": "bfloat16"}
    assert trained_quantization({"a": {"quantization": same},
                                 "b": {"metrics": {"compute_dtype": "bfloat16"}}}) == same
    with pytest.raises(FusionError, match="float32"):
        trained_quantization({"a": {"quantization": same},
                              "b": {"quantization": {"weight_dtype": "float32"}}})


# --------------------------------------------------------------------------- 4
def _task_objective(pipeline_run) -> list[str]:
    tasks = load_config(pipeline_run["config"]).eval.include_paths[0]
    return ["--set", "search.objective.type=lm_eval",
            "--set", "search.objective.tasks=[demo_colours]",
            "--set", f"search.objective.include_paths=[{tasks}]",
            "--set", "search.objective.limit=4",
            "--set", "search.objective.allow_test_split=true"]


def test_ablate_with_a_task_objective_learns_on_validation_loss(pipeline_run, tmp_path):
    run = _copy_run(pipeline_run, tmp_path, "search*", "eval*")
    res = runner.invoke(app, ["ablate", str(pipeline_run["config"]), "--set", f"run_dir={run}",
                              *_task_objective(pipeline_run),
                              "--set", "ablate.variants=[gradient]"])
    assert res.exit_code == 0, (res.output, res.exception)
    best = json.loads((run / "ablate" / "gradient" / "search" / "best.json").read_text())
    assert best["method"] == "gradient" and best["objective"] == "val_loss"
    labels = [r["model"] for r in json.loads((run / "ablate" / "table.json").read_text())["rows"]]
    assert labels == ["base", "fusion, learned (gradient on validation loss)"]


def test_ablate_refuses_a_variant_that_cannot_run_before_any_work(pipeline_run, tmp_path):
    run = tmp_path / "fresh"
    res = runner.invoke(app, ["ablate", str(pipeline_run["config"]), "--set", f"run_dir={run}",
                              *_task_objective(pipeline_run), "--set", "search.method=gradient"])
    assert res.exit_code != 0
    assert "searched (method gradient needs a differentiable objective" in res.output
    assert "drop them from ablate.variants" in res.output
    assert not (run / "curate").exists() and not (run / "adapters").exists()


def test_every_default_variant_is_valid_for_a_layer_wise_gradient_search(pipeline_run):
    """The fixed-weight variants search one grid point per adapter: with the run's own search
    learning layer-wise weights they must not inherit its granularity."""
    from fashionfuse.experiments.ablate import check_fusion_variants, fusion_variants

    data = load_config(pipeline_run["config"]).model_dump(mode="json")
    data["search"].update(method="gradient", granularity="layer")
    cfg = type(load_config(pipeline_run["config"])).model_validate(data)
    planned = fusion_variants(cfg)
    check_fusion_variants(cfg, planned)
    assert {v.folder for v in planned} >= {"weights-one", "uniform", "ties", "dare", "magnitude"}
    assert all(v.search["granularity"] == "adapter" for v in planned
               if v.folder in ("weights-one", "uniform"))


# --------------------------------------------------------------------------- 5 and 7
def _forward_batches(model) -> list[int]:
    sizes = []
    model.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(
        (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]),
        with_kwargs=True)
    return sizes


def test_auto_batch_size_is_found_per_row_length(tiny_model, monkeypatch):
    """Two groups with as many requests but rows of different lengths get their own batch
    size (a size found for short rows would not fit long ones)."""
    from fashionfuse.evaluate import forward_memory
    from fashionfuse.evaluate.lm_eval_run import wrap_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lm = wrap_model(model, tokenizer, "auto")
    long_len = lm.max_length - 1
    per_long = forward_memory.row_bytes(model.config, long_len, 4)
    monkeypatch.setattr(forward_memory, "available_bytes",
                        lambda device: int(40 * per_long / forward_memory.HEADROOM))
    calls = _forward_batches(model)
    short = [(None, list(range(3, 20)), [5])] * 8
    long = [(None, list(range(3, 3 + long_len)), [5])] * 8
    assert lm._detect_batch_size(short, 0) == 64  # capped at lm-eval's max_batch_size
    assert lm._detect_batch_size(long, 0) == 40
    assert lm._detect_batch_size(short, 0) == 64
    assert calls == []  # on a CPU no trial forward runs


def test_auto_batch_size_fits_a_large_vocabulary_without_allocating(tiny_model, monkeypatch):
    """A 49,152-token vocabulary: 64 rows of 512 positions would need about 19 GB of logits.
    With 1 GB available the detected size fits half of it, nothing was allocated to find it,
    and the requests are then scored in batches of that size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fashionfuse.evaluate import forward_memory
    from fashionfuse.evaluate.lm_eval_run import wrap_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=49_152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    available = 1 << 30
    monkeypatch.setattr(forward_memory, "available_bytes", lambda device: available)
    lm = wrap_model(model, tokenizer, "auto")
    length = lm.max_length - 1
    per_row = forward_memory.row_bytes(model.config, length, 4)
    assert 64 * per_row > available  # lm-eval's first trial would not fit
    calls = _forward_batches(model)
    requests = [(None, list(range(3, 3 + length - k)), [7, 9]) for k in range(5)]
    size = lm._detect_batch_size(requests, 0)
    assert calls == [] and 1 <= size < 64
    assert size * per_row <= forward_memory.HEADROOM * available
    got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(got) == 5 and calls and max(calls) <= size


# --------------------------------------------------------------------------- 6
def test_trailing_logits_match_when_a_row_ends_in_token_zero(tiny_model):
    """A = (ctx, [9, 0, 11]) and B = (ctx + [9], [12]) in one batch: A's row is B's row plus
    a real 0, indistinguishable from padding; both are scored as plain HFLM scores them."""
    from lm_eval.models.huggingface import HFLM

    from fashionfuse.evaluate.lm_eval_run import wrap_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    wrapped = wrap_model(model, tokenizer, 4)
    ctx = list(range(30, 50))
    requests = [(None, ctx, [9, 0, 11]), (None, ctx + [9], [12])]
    expected = plain._loglikelihood_tokens(requests, disable_tqdm=True)
    got = wrapped._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [flag for _, flag in got] == [flag for _, flag in expected]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-4)


# --------------------------------------------------------------------------- found on the way
def test_4bit_weights_keep_their_layout_after_a_no_gradient_pass(tiny_model):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for an inference kernel on
    its first no-gradient forward in eval mode, and keeps it: that kernel has no backward, so a
    later training step (or gradient-learned fusion weights) would lose its gradients. The base
    keeps the standard layout: after a no-gradient pass the dequantised weights are unchanged
    and a backward pass reaches the input. (On a CPU without AVX512-BF16 nothing is repacked.)"""
    import bitsandbytes as bnb

    from fashionfuse.base_model import load_base_model
    from fashionfuse.config import ModelConfig

    model = load_base_model(ModelConfig(base=str(tiny_model)), device="cpu").eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    before = {n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
              for n, m in layers.items()}
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    with torch.no_grad():
        model(input_ids=ids)
    for name, module in layers.items():
        assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False), name
        assert torch.equal(bnb.functional.dequantize_4bit(module.weight.data,
                                                          module.weight.quant_state), before[name])
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits.float().sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
