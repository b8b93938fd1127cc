"""Adapters made by PEFT itself (as axolotl, LLaMA-Factory or TRL save them), with the LoRA
variants they come in: different ranks and alphas, rsLoRA, `rank_pattern` / `alpha_pattern`.
Each module's own scale is honoured by the fusion and by the GGUF and vLLM exports; DoRA, a
trained bias and `modules_to_save` are refused in one line naming the adapter."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from fashionfuse.adapters.saved import (
    FusionError,
    check_fusable,
    fuse_adapters,
    load_saved_adapter,
    save_peft_adapter,
    task_delta,
)

from .conftest import logits_with

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "layers.1.mlp.up_proj": 6},
                     alpha_pattern={"v_proj": 32, "down_proj": 3}),
}


def _peft_adapter(tiny_model, out, seed, **lora):
    """A PEFT adapter saved by PEFT, with random B (PEFT starts B at zero)."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(target_modules=TARGETS, init_lora_weights=False,
                                            task_type="CAUSAL_LM", **lora))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def peft_adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-variants")
    return {name: _peft_adapter(tiny_model, root / name, seed=k, **lora)
            for k, (name, lora) in enumerate(VARIANTS.items())}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_adapter_fused_at_weight_1_is_the_adapter(tiny_model, peft_adapters, tmp_path,
                                                      variant):
    """Fused alone with weight 1, each variant gives PEFT's own logits for the adapter (PEFT's
    add_weighted_adapter does not for rsLoRA: PEFT #3761); the fused adapter has one rank."""
    saved = load_saved_adapter(peft_adapters[variant])
    config, tensors = fuse_adapters([saved], [1.0])
    save_peft_adapter(tmp_path / "fused", config, tensors)
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {saved.max_rank}
    torch.testing.assert_close(logits_with(tiny_model, tmp_path / "fused"),
                               logits_with(tiny_model, peft_adapters[variant]),
                               rtol=1e-5, atol=1e-5)


def test_module_scales_follow_the_patterns(peft_adapters):
    saved = load_saved_adapter(peft_adapters["patterns"])
    scales = {m.split("model.layers.")[1]: (saved.rank_of(m), saved.module_scale(m))
              for m in saved.modules}
    assert scales["0.self_attn.q_proj"] == (2, 4.0)  # rank 2, alpha 8
    assert scales["0.self_attn.v_proj"] == (4, 8.0)  # alpha 32 / rank 4
    assert scales["1.mlp.up_proj"] == (6, 8 / 6)
    assert scales["0.mlp.up_proj"] == (4, 2.0)
    assert scales["1.mlp.down_proj"] == (4, 0.75)


def test_a_weighted_mixture_is_the_sum_of_deltas(tiny_model, peft_adapters, tmp_path):
    saved = [load_saved_adapter(p) for p in peft_adapters.values()]
    weights = [0.3, 0.9, -0.4]
    config, tensors = fuse_adapters(saved, weights)
    save_peft_adapter(tmp_path / "fused", config, tensors)
    deltas = {m: sum(w * task_delta(a, m) for a, w in zip(saved, weights))
              for m in saved[0].modules}
    torch.testing.assert_close(logits_with(tiny_model, tmp_path / "fused"),
                               logits_with(tiny_model, deltas=deltas), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exports_carry_each_module_scale(tiny_model, peft_adapters, tmp_path, variant):
    """vLLM: the written adapter loads in PEFT as the original (per-module scales folded, one
    rank); GGUF: each module's B A is PEFT's update (rows in llama.cpp's rotary order for q/k)."""
    import json

    pytest.importorskip("gguf")
    from fashionfuse.deploy.gguf_lora import gguf_lora_tensors, permute_rows
    from fashionfuse.deploy.vllm import export_vllm

    record = export_vllm(peft_adapters[variant], tmp_path / "vllm", max_rank=None)
    assert record["exact"]
    torch.testing.assert_close(logits_with(tiny_model, tmp_path / "vllm"),
                               logits_with(tiny_model, peft_adapters[variant]),
                               rtol=1e-5, atol=1e-5)
    saved = load_saved_adapter(peft_adapters[variant])
    model_config = json.loads((tiny_model / "config.json").read_text())
    _, rank, tensors = gguf_lora_tensors(saved, model_config)
    assert rank == saved.max_rank
    module = next(m for m in saved.modules if m.endswith("layers.0.self_attn.v_proj"))
    got = tensors["blk.0.attn_v.weight.lora_b"] @ tensors["blk.0.attn_v.weight.lora_a"]
    torch.testing.assert_close(got.double(), task_delta(saved, module), rtol=1e-5, atol=1e-6)
    q = next(m for m in saved.modules if m.endswith("layers.0.self_attn.q_proj"))
    got = tensors["blk.0.attn_q.weight.lora_b"] @ tensors["blk.0.attn_q.weight.lora_a"]
    want = permute_rows(task_delta(saved, q), model_config["num_attention_heads"])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("feature, lora, match", [
    ("dora", dict(r=4, lora_alpha=8, use_dora=True), "DoRA"),
    ("lora_bias", dict(r=4, lora_alpha=8, lora_bias=True), "LoRA bias"),
    ("modules_to_save", dict(r=4, lora_alpha=8, modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_unfusable_variants_are_refused_naming_the_adapter(tiny_model, tmp_path, feature, lora,
                                                           match):
    import warnings

    with warnings.catch_warnings():  # PEFT: lora_bias on layers without a bias
        warnings.simplefilter("ignore")
        path = _peft_adapter(tiny_model, tmp_path / feature, seed=3, **lora)
    with pytest.raises(FusionError, match=match) as err:
        check_fusable([load_saved_adapter(path)])
    assert str(path) in str(err.value) and "\n" not in str(err.value)
