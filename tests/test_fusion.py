"""Exact fusion: the fused adapter equals sum_i w_i * scale_i * B_i A_i, checked independently."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fashionfuse.adapters.saved import FusionError, fuse_adapters, load_saved_adapter, save_peft_adapter
from fashionfuse.adapters.runtime import attach_adapters, set_fusion_weights

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _make_adapter(base_dir, out, r, alpha, seed, **extra):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False,
                     task_type="CAUSAL_LM", **extra)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mixed_rank_adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [_make_adapter(tiny_model, root / "a", r=2, alpha=4, seed=1),
            _make_adapter(tiny_model, root / "b", r=5, alpha=3, seed=2),
            _make_adapter(tiny_model, root / "c", r=3, alpha=16, seed=3)]


def _independent_delta(dirs, weights):
    """sum_i w_i * (alpha_i / r_i) * B_i @ A_i straight from the saved files, in float64."""
    out = {}
    for d, w in zip(dirs, weights):
        cfg = json.loads((d / "adapter_config.json").read_text())
        tensors = load_file(d / "adapter_model.safetensors")
        for key, a in tensors.items():
            if ".lora_A." in key:
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                mod = key.split(".lora_A.")[0]
                delta = w * cfg["lora_alpha"] / cfg["r"] * (b.double() @ a.double())
                out[mod] = out.get(mod, 0) + delta
    return out


def test_fused_adapter_file_is_exact_weighted_sum(mixed_rank_adapters, tmp_path):
    weights = [0.7, -0.3, 1.25]
    saved = [load_saved_adapter(d) for d in mixed_rank_adapters]
    config, tensors = fuse_adapters(saved, weights)
    save_peft_adapter(tmp_path / "fused", config, tensors)
    expected = _independent_delta(mixed_rank_adapters, weights)
    got = _independent_delta([tmp_path / "fused"], [1.0])
    assert config["r"] == 2 + 5 + 3
    assert set(got) == set(expected) and len(got) == 2 * len(TARGETS)
    for mod in expected:
        torch.testing.assert_close(got[mod], expected[mod], rtol=1e-5, atol=1e-7)


def test_fused_model_outputs_match_dense_merge_and_multi_adapter(tiny_model, mixed_rank_adapters, tmp_path):
    from peft import PeftModel

    weights = [0.5, 1.0, 0.25]
    saved = [load_saved_adapter(d) for d in mixed_rank_adapters]
    save_peft_adapter(tmp_path / "fused", *fuse_adapters(saved, weights))
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 40]])

    dense = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    delta = _independent_delta(mixed_rank_adapters, weights)
    with torch.no_grad():
        for mod, d in delta.items():
            dense.get_submodule(mod.removeprefix("base_model.model.")).weight += d
        want = dense(ids).logits

    fused = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64), tmp_path / "fused")
    multi = attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64),
                            {f"a{i}": d for i, d in enumerate(mixed_rank_adapters)})
    set_fusion_weights(multi, {f"a{i}": w for i, w in enumerate(weights)})
    with torch.no_grad():
        # the fused file stores float32 matrices, hence float32-level agreement
        torch.testing.assert_close(fused(ids).logits, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(multi(ids).logits, want, rtol=1e-9, atol=1e-9)
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)(ids).logits
        set_fusion_weights(multi, {f"a{i}": 0.0 for i in range(3)})
        torch.testing.assert_close(multi(ids).logits, base_logits)
    assert not torch.allclose(want, base_logits)


def test_refuses_dora(tiny_model, mixed_rank_adapters, tmp_path):
    dora = _make_adapter(tiny_model, tmp_path / "dora", r=2, alpha=4, seed=4, use_dora=True)
    with pytest.raises(FusionError, match="DoRA"):
        load_saved_adapter(dora)


def test_mixes_rslora_and_plain_scaling_exactly(tiny_model, mixed_rank_adapters, tmp_path):
    """Each adapter's own scale (alpha / sqrt(r) with rsLoRA) is folded into its B: a mixture of
    rsLoRA and plain LoRA is the exact sum of their updates."""
    from fashionfuse.adapters.saved import task_delta

    rs = _make_adapter(tiny_model, tmp_path / "rs", r=2, alpha=4, seed=5, use_rslora=True)
    parts = [load_saved_adapter(mixed_rank_adapters[0]), load_saved_adapter(rs)]
    config, tensors = fuse_adapters(parts, [0.5, 2.0])
    assert config["lora_alpha"] == config["r"] and not config["use_rslora"]
    for m in parts[0].modules:
        got = tensors[f"{m}.lora_B.weight"].double() @ tensors[f"{m}.lora_A.weight"].double()
        want = 0.5 * task_delta(parts[0], m) + 2.0 * task_delta(parts[1], m)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_refuses_other_base_and_other_targets(tiny_model, mixed_rank_adapters, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(mixed_rank_adapters[1], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-70b-hf"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FusionError, match="trained on base"):
        fuse_adapters([load_saved_adapter(mixed_rank_adapters[0]), load_saved_adapter(other)], [1, 1])

    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
                   ).save_pretrained(tmp_path / "qonly")
    with pytest.raises(FusionError, match="target modules differ"):
        fuse_adapters([load_saved_adapter(mixed_rank_adapters[0]),
                       load_saved_adapter(tmp_path / "qonly")], [1, 1])


def test_missing_adapter_dir_is_clear(tmp_path):
    with pytest.raises(FusionError, match="adapter_config.json: not found"):
        load_saved_adapter(tmp_path)


def test_a_zero_weight_adapter_adds_nothing_to_the_fused_adapter(mixed_rank_adapters, tmp_path):
    """Weights (0.7, 0, 0.5): the fused adapter holds the two weighted adapters only (rank
    and size), the same update, and says which it left out."""
    from fashionfuse.adapters.saved import weighted_delta
    from fashionfuse.fusion.export import write_fused

    saved = [load_saved_adapter(p) for p in mixed_rank_adapters[:3]]
    names = ["a", "b", "c"][:len(saved)]
    weights = dict(zip(names, [0.7, 0.0, 0.5]))
    report, _ = write_fused(tmp_path / "fused", saved, names, weights)
    fused = load_saved_adapter(tmp_path / "fused")
    assert report["left_out_zero_weight"] == ["b"]
    assert fused.config["r"] == saved[0].max_rank + saved[2].max_rank
    got = weighted_delta([fused], [1.0])
    want = weighted_delta(saved, [0.7, 0.0, 0.5])
    for m in want:
        torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-7)
