"""Merging adapters into the base: a 4-bit base is quantised once from W0 + delta (rounds,
model.merge_adapters); a sequential adapter trains beside the frozen earlier one; the merged
export keeps small updates and reports what it lost."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fashionfuse.base_model import load_base_model
from fashionfuse.config import ModelConfig, TrainingConfig
from fashionfuse.adapters.runtime import attach_adapters
from fashionfuse.fusion.export import export_merged_model
from fashionfuse.adapters.saved import load_saved_adapter, weighted_delta

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 40, 17, 23]])


def _small_update_adapter(base_dir, out, relative: float, seed: int = 0):
    """A rank-4 LoRA whose update is about `relative` of each weight's size (Frobenius)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS,
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, module in peft.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                delta_norm = (b @ a).norm()
                b.mul_(relative * module.base_layer.weight.norm() / delta_norm)
    peft.save_pretrained(out)
    return out


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_merge_into_4bit_base_quantises_once_from_full_precision(tiny_model, tmp_path):
    """The merged 4-bit base is (nearly) `quant(W0 + delta)`, not the plain base: PEFT's
    merge into NF4 (dequantise, add, re-quantise) rounded most of such an update away."""
    from peft import PeftModel

    adapter = _small_update_adapter(tiny_model, tmp_path / "small", relative=0.02)
    # reference: full-precision base + update, saved, then quantised once by transformers
    full = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    PeftModel.from_pretrained(full, adapter).merge_and_unload().save_pretrained(tmp_path / "ref")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "ref")
    ref = _logits(load_base_model(ModelConfig(base=str(tmp_path / "ref")), device="cpu"))
    plain = _logits(load_base_model(ModelConfig(base=str(tiny_model)), device="cpu"))
    merged = _logits(load_base_model(ModelConfig(base=str(tiny_model), merge_adapters=[str(adapter)]),
                                     device="cpu"))
    to_ref, plain_to_ref = (merged - ref).abs().max(), (plain - ref).abs().max()
    assert plain_to_ref > 1e-2, "the update must be visible after quantisation"
    assert to_ref < 0.1 * plain_to_ref, (to_ref, plain_to_ref)


def test_sequential_adapter_starts_from_base_plus_earlier_adapter(tiny_model, tmp_path):
    """`on_top_of`: before any step (new B = 0) the trainable model is exactly the 4-bit base
    with the earlier adapter active, i.e. the concatenated adapter that is saved and evaluated;
    only the new adapter's weights train."""
    from fashionfuse.train.model import build_trainable_model

    earlier = _small_update_adapter(tiny_model, tmp_path / "earlier", relative=0.02)
    cfg = ModelConfig(base=str(tiny_model))
    train = TrainingConfig(packing=False, lora={"r": 4, "alpha": 8, "target_modules": TARGETS})
    model = build_trainable_model(cfg, train, device="cpu", frozen_adapters=[earlier]).model.eval()
    from peft import prepare_model_for_kbit_training

    def prepared():  # k-bit training keeps norms in float32: compare like with like
        return prepare_model_for_kbit_training(load_base_model(cfg, device="cpu"),
                                               use_gradient_checkpointing=False)

    want = _logits(attach_adapters(prepared(), {"earlier": earlier}))
    plain = _logits(prepared())
    got = _logits(model)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)


@pytest.mark.parametrize("export_dtype, lost", [("float32", False), ("bfloat16", True)])
def test_merged_export_keeps_small_updates_and_reports_its_error(tiny_model, tmp_path,
                                                                  export_dtype, lost):
    from fashionfuse.base_model import DTYPES

    adapter = _small_update_adapter(tiny_model, tmp_path / "tiny_update", relative=4e-4)
    cfg = ModelConfig(base=str(tiny_model),
                      quantization={"bits": 16, "compute_dtype": "float32"})
    out = tmp_path / f"merged-{export_dtype}"
    report = export_merged_model(cfg, adapter, out, DTYPES[export_dtype])
    assert json.loads((out / "export_report.json").read_text()) == report
    # measure independently: saved weights vs float64 W0 + delta
    saved = load_file(out / "model.safetensors")
    base = load_file(next(tiny_model.glob("*.safetensors")))
    err_sq = delta_sq = 0.0
    for key, delta in weighted_delta([load_saved_adapter(adapter)], [1.0]).items():
        name = key.removeprefix("base_model.model.") + ".weight"
        exact = base[name].double() + delta
        err_sq += float((saved[name].double() - exact).norm()) ** 2
        delta_sq += float(delta.norm()) ** 2
    measured = (err_sq / delta_sq) ** 0.5
    assert report["update_relative_error"] == pytest.approx(measured, rel=1e-3, abs=1e-9)
    if lost:
        assert measured > 0.1  # bf16 rounding eats a large share of a 4e-4 update
    else:
        assert measured < 1e-3 and report["dtype"] == "float32"  # float32 rounding only


def test_merged_export_defaults_to_the_stored_dtype(tiny_model, tmp_path):
    from fashionfuse.fusion.export import stored_dtype

    cfg = ModelConfig(base=str(tiny_model))
    assert stored_dtype(cfg) == torch.float32  # the demo model is stored in float32
