"""Every touch of a library's internals is version-gated (`fashionfuse.version_gates`): outside
the versions it was tested with, or with `FASHIONFUSE_PUBLIC_PATHS` naming the library, it
takes the library's public path. One test per touch runs that public path and compares its
results with the fast one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fashionfuse import version_gates


@pytest.fixture
def public_paths(monkeypatch):
    """Call with library names to force their public paths for the rest of the test."""

    def force(*libraries: str) -> None:
        monkeypatch.setenv(version_gates.FORCE_ENV, ",".join(libraries))
        monkeypatch.setattr(version_gates, "_told", set())

    monkeypatch.delenv(version_gates.FORCE_ENV, raising=False)
    return force


def test_the_gate_reads_the_tested_range_and_says_why_once(public_paths, capsys, monkeypatch):
    assert version_gates.in_tested_range("peft", "0.21.2")
    assert not version_gates.in_tested_range("peft", "0.22.0")
    assert not version_gates.in_tested_range("lm-eval", "0.4.12")
    assert version_gates.internals_allowed("peft")  # the installed versions are the tested ones
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(version_gates, "installed_version", lambda library: "0.99.0")
    assert not version_gates.internals_allowed("peft")
    assert not version_gates.internals_allowed("peft")
    err = capsys.readouterr().err.splitlines()
    assert err == ["fashionfuse: peft 0.99.0 is outside the versions its internals were tested "
                   "with (>=0.21.2,<0.22): using peft's public path (slower, same results)"]
    public_paths("all")
    assert not version_gates.internals_allowed("lm-eval")
    assert "FASHIONFUSE_PUBLIC_PATHS names it" in capsys.readouterr().err
    with pytest.raises(KeyError, match="no version gate"):
        version_gates.internals_allowed("numpy")


# ----------------------------------------------------------------------------- PEFT
def test_peft_public_path_forward_and_dropout(float32_trainable, public_paths):
    """PEFT's own forward and nn.Dropout: the same logits without gradients (bit for bit), the
    same loss and LoRA gradients with them (eval mode: no dropout draws to differ)."""
    from fashionfuse.adapters.runtime import lora_layers

    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    results = {}
    for route in ("fast", "public"):
        if route == "public":
            public_paths("peft")
        model = float32_trainable(init_seed=1, build_seed=0).eval()
        layers = lora_layers(model).values()
        results[route] = {
            "own_forward": sum("forward" in vars(layer) for layer in layers),
            "torch_dropout": sum(isinstance(layer.lora_dropout["default"], torch.nn.Dropout)
                                 for layer in layers)}
        with torch.no_grad():
            results[route]["logits"] = model(input_ids=ids).logits
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results[route]["loss"] = out.loss.item()
        results[route]["grads"] = {n: p.grad for n, p in model.named_parameters()
                                   if p.grad is not None}
    fast, public = results["fast"], results["public"]
    assert fast["own_forward"] > 0 and fast["torch_dropout"] == 0
    assert public["own_forward"] == 0 and public["torch_dropout"] > 0
    assert torch.equal(fast["logits"], public["logits"])
    assert fast["loss"] == pytest.approx(public["loss"], rel=1e-6)
    assert fast["grads"].keys() == public["grads"].keys() and fast["grads"]
    for name, grad in fast["grads"].items():
        torch.testing.assert_close(grad, public["grads"][name], rtol=1e-5, atol=1e-7)


def test_peft_public_path_tensor_scales(float32_trainable, public_paths):
    """Learned fusion weights through PEFT's `set_scale` instead of its `scaling` dict: the
    same loss and the same gradient on w."""
    from fashionfuse.adapters.peft_layers import tensor_fusion_weights

    model = float32_trainable(init_seed=1, build_seed=0).eval()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for route in ("fast", "public"):
        if route == "public":
            public_paths("peft")
        keys, apply = tensor_fusion_weights(model, ["default"], "layer")
        w = torch.linspace(0.5, 1.5, len(keys)).requires_grad_(True)
        apply(w)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.item(), w.grad.clone()))
    assert len(keys) > 1
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-8)
    assert grads[0][1].abs().sum() > 0


# ----------------------------------------------------------------------------- lm-eval
def test_lm_eval_public_path_is_plain_hflm_with_the_same_scores(tiny_model, public_paths):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fashionfuse.evaluate.lm_eval_model import encode_pairs_once, render_prompts_once
    from fashionfuse.evaluate.lm_eval_run import wrap_model
    from .test_shared_context import _requests

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    fast = wrap_model(model, tokenizer, "auto")
    public_paths("lm-eval")
    public = wrap_model(model, tokenizer, "auto")
    assert public._shared is None and not public._trailing_logits
    assert fast._shared is not None and fast._trailing_logits
    requests = _requests(model, fast.max_length)
    expected = fast._loglikelihood_tokens(requests, disable_tqdm=True)
    got = public._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [flag for _, flag in got] == [flag for _, flag in expected]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-5)
    assert public.tokens_through_model > fast.tokens_through_model

    class Task:
        def build_all_requests(self, **kwargs):
            return None

    task = Task()
    render_prompts_once(task)
    encode_pairs_once(public)
    assert "build_all_requests" not in vars(task) and "_encode_pair" not in vars(public)


def test_lm_eval_cli_on_public_paths_scores_like_fashionfuse_eval(pipeline_run, tmp_path):
    """lm-eval's own CLI with every fashionfuse shortcut off (lm-eval, PEFT, bitsandbytes public
    paths) scores the demo's fused adapter as `fashionfuse eval` (all shortcuts on) did."""
    from .test_lm_eval_model import run_cli

    run = pipeline_run["run_dir"]
    theirs, stderr = run_cli(pipeline_run, tmp_path, f",peft={run}/search/fused",
                             FASHIONFUSE_PUBLIC_PATHS="all")
    for library in ("lm-eval", "peft", "bitsandbytes"):
        assert f"using {library}'s public path" in stderr
    ours = json.loads((run / "eval" / "fused" / "results.json").read_text())["results"]
    for task in ("demo_colours", "demo_opposites"):
        for metric in ("acc,none", "acc_norm,none"):
            assert theirs[task][metric] == ours[task][metric], (task, metric)


# ----------------------------------------------------------------------------- bitsandbytes
def test_bitsandbytes_public_path_keeps_the_4bit_layout(tiny_model, public_paths):
    """A no-gradient eval pass leaves every 4-bit weight as stored on both paths (bitsandbytes
    would repack it for its CPU inference kernel on AVX512-BF16 CPUs), with the same logits."""
    import bitsandbytes as bnb

    from fashionfuse.base_model import load_base_model
    from fashionfuse.config import ModelConfig

    cfg = ModelConfig(base=str(tiny_model), quantization={"compute_dtype": "float32"})
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = []
    for route in ("fast", "public"):
        if route == "public":
            public_paths("bitsandbytes")
        model = load_base_model(cfg, quantized=True, device="cpu").eval()
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        stored = [m.weight.data.clone() for m in layers]
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
        assert all(torch.equal(m.weight.data, s) for m, s in zip(layers, stored)), route
        assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                       for m in layers)
    assert torch.equal(logits[0], logits[1])


# ----------------------------------------------------------------------------- transformers
def test_transformers_public_path_saves_the_same_plain_checkpoint(tiny_model, tmp_path,
                                                                   public_paths):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fashionfuse.gguf_base import as_plain_model

    saved = {}
    for route in ("fast", "public"):
        if route == "public":
            public_paths("transformers")
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        model.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF load leaves it
        plain = as_plain_model(model)
        assert (plain is model) == (route == "fast")
        plain.save_pretrained(tmp_path / route)
        config = json.loads((tmp_path / route / "config.json").read_text())
        assert "quantization_config" not in config
        saved[route] = (config, load_file(tmp_path / route / "model.safetensors"))
    assert saved["fast"][0] == saved["public"][0]
    fast, public = saved["fast"][1], saved["public"][1]
    assert fast.keys() == public.keys()
    assert all(torch.equal(fast[k], public[k]) for k in fast)


def test_each_private_name_lives_in_one_module_per_library():
    """The internals named in the architecture page's table appear in exactly one module of each library."""
    src = Path(__file__).resolve().parents[1] / "src" / "fashionfuse"
    homes = {"evaluate/lm_eval_model.py": ("_loglikelihood_tokens", "_model_call", "_encode_pair",
                                  "_detect_batch_size", "build_all_requests", "_instances",
                                  "self._rank", "self._world_size"),
             "adapters/peft_layers.py": ("_cast_input_dtype", ".scaling[", ".lora_dropout["),
             "base_model.py": ("support_avx512bf16_for_cpu",),
             "gguf_base.py": ("hf_quantizer", "is_quantized"),
             "train/gated_mlp.py": ("inspect.getsource(",)}
    texts = {p.relative_to(src).as_posix(): p.read_text() for p in src.rglob("*.py")}
    for home, names in homes.items():
        for name in names:
            found = sorted(path for path, text in texts.items() if name in text)
            assert found == [home], (name, found)
    for gone in ("._quantize(", "._storage", "._trial_id"):  # now through public APIs
        assert not [path for path, text in texts.items() if gone in text], gone
