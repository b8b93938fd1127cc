"""Merge-ready adapters (`training.lora.shared_a`): every adapter of a run starts from one
seeded A, frozen, and trains B only; their weighted sum is then exact at rank r."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from fashionfuse.adapters.saved import (
    fuse_adapters,
    load_saved_adapter,
    save_peft_adapter,
    task_delta,
)
from fashionfuse.cli import app

from .conftest import logits_with

runner = CliRunner()
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 40]])


def test_two_merge_ready_adapters_fuse_exactly_at_rank_r(make_config, tmp_path, tiny_model):
    path = make_config(training={"batch_size": 8, "micro_batch_size": 4, "max_steps": 3,
                                 "learning_rate": 5e-3, "lora": {"r": 4, "alpha": 8,
                                                                 "shared_a": True}})
    assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
    result = runner.invoke(app, ["train-adapter", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run" / "adapters"
    chat, orca = (load_saved_adapter(run / n) for n in ("chat", "orca"))
    hashes = {json.loads((run / n / "manifest.json").read_text())["shared_a"]
              for n in ("chat", "orca")}
    assert len(hashes) == 1 and None not in hashes  # one A, recorded
    for m in chat.modules:
        assert torch.equal(chat.lora_a[m], orca.lora_a[m])  # A shared and frozen
    assert any(chat.lora_b[m].abs().sum() > 0 for m in chat.modules)  # B trained
    assert any(not torch.equal(chat.lora_b[m], orca.lora_b[m]) for m in chat.modules)

    config, tensors = fuse_adapters([chat, orca], [0.3, 0.9])
    save_peft_adapter(tmp_path / "fused", config, tensors)
    assert config["r"] == 4  # not 8: the rank each adapter was trained at
    deltas = {m: 0.3 * task_delta(chat, m) + 0.9 * task_delta(orca, m) for m in chat.modules}
    base = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert all(t.shape[0] == 4 for k, t in base.items() if "lora_A" in k)
    torch.testing.assert_close(logits_with(tiny_model, tmp_path / "fused"),
                               logits_with(tiny_model, deltas=deltas), rtol=1e-5, atol=1e-5)


def test_peft_linear_merge_is_not_the_weighted_sum_even_with_a_shared_a(make_config, tmp_path,
                                                                        tiny_model):
    """PEFT's add_weighted_adapter("linear") weighs A and B by sqrt(w_i scale_i) each and sums
    them separately: with one shared A its update is (sum_i sqrt(w_i s_i) B_i)(sum_j
    sqrt(w_j s_j)) A, not sum_i w_i s_i B_i A (they agree for one adapter only); "cat" and
    fashionfuse's fusion are the weighted sum."""
    path = make_config(training={"batch_size": 8, "micro_batch_size": 4, "max_steps": 2,
                                 "learning_rate": 5e-3, "lora": {"r": 4, "alpha": 8,
                                                                 "shared_a": True}})
    assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
    assert runner.invoke(app, ["train-adapter", str(path)]).exit_code == 0
    run = tmp_path / "run" / "adapters"
    chat, orca = (load_saved_adapter(run / n) for n in ("chat", "orca"))
    exact = logits_with(tiny_model, deltas={m: 0.3 * task_delta(chat, m)
                                            + 0.9 * task_delta(orca, m) for m in chat.modules})
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), str(run / "chat"),
        adapter_name="chat")
    model.load_adapter(str(run / "orca"), adapter_name="orca")
    got = {}
    for kind in ("linear", "cat"):
        model.add_weighted_adapter(["chat", "orca"], [0.3, 0.9], f"m_{kind}",
                                   combination_type=kind)
        model.set_adapter(f"m_{kind}")
        model.eval()  # the new adapter's dropout layers are created in training mode
        with torch.no_grad():
            got[kind] = model(IDS).logits
    torch.testing.assert_close(got["cat"], exact, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got["linear"], exact, rtol=1e-4, atol=1e-4)
