"""train-adapter through the CLI: QLoRA (4-bit NF4), loadable adapters, resume from checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fashionfuse.allocator import active_allocator
from fashionfuse.cli import app
from fashionfuse.config import load_config
from fashionfuse.examples import collate
from fashionfuse.head_loss import token_losses
from fashionfuse.train.batching import (
    collate_packed,
    pack_rows,
    plan_micro_batches,
    step_windows,
)
from fashionfuse.train.trainer import train_one_adapter

from .conftest import stop_after

runner = CliRunner()


def test_each_adapter_lowers_its_validation_loss(pipeline_run):
    """Learned, measured: each adapter's per-token loss on its own held-out validation split,
    on the 4-bit base it was trained on, is below the base's."""
    import torch
    from peft import PeftModel

    from fashionfuse.base_model import load_base_model, load_tokenizer
    from fashionfuse.config import load_config
    from fashionfuse.examples import collate, load_records, tokenize_records
    from fashionfuse.head_loss import token_losses

    cfg = load_config(pipeline_run["config"])
    tok = load_tokenizer(cfg.model)
    run = pipeline_run["run_dir"]
    for name in ("chat", "orca"):
        examples = tokenize_records(load_records(run / "curate" / name / "validation.jsonl"), tok,
                                    cfg.model.system_message, cfg.model.max_input_len)
        model = PeftModel.from_pretrained(load_base_model(cfg.model, device="cpu"),
                                          str(run / "adapters" / name)).eval()
        batch = collate(examples, tok.pad_token_id)
        with torch.no_grad():
            total, n = token_losses(model, batch)
            with model.disable_adapter():
                base_total, _ = token_losses(model, batch)
        assert float(total) / n < float(base_total) / n, name


def test_adapters_are_peft_loadable_and_learned(pipeline_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = pipeline_run["run_dir"]
    for name in ("chat", "orca"):
        d = run / "adapters" / name
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
        assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                              "up_proj", "down_proj"}
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pipeline_run["model"]), d)
        assert any("lora_B" in n for n, _ in model.named_parameters())
        b = [t for k, t in load_file(d / "adapter_model.safetensors").items() if "lora_B" in k]
        assert any(t.abs().sum() > 0 for t in b), "B matrices still zero: nothing was trained"
        history = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert [h["step"] for h in history] == [1, 2, 3, 4]
        assert all(h["tokens_per_s"] > 0 for h in history)
        assert (d / "loss.png").stat().st_size > 1000
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["stage"] == "train" and manifest["metrics"]["steps"] == 4
        assert manifest["metrics"]["loss"] == "chunked output head"  # which loss ran
        assert manifest["allocator"] == active_allocator()  # which malloc ran
        assert "chat_template" in (d / "tokenizer_config.json").read_text() or (d / "chat_template.jinja").exists()


def test_training_runs_on_a_4bit_nf4_base(make_config):
    from bitsandbytes.nn import Linear4bit

    from fashionfuse.base_model import load_base_model

    cfg = load_config(make_config())
    model = load_base_model(cfg.model)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers, "base not quantised"
    q = layers[0].weight.quant_state
    assert q.quant_type == "nf4" and q.nested  # nested == double quantisation
    from fashionfuse.base_model import DTYPES, resolve_compute_dtype

    assert layers[0].compute_dtype == DTYPES[resolve_compute_dtype(cfg.model.quantization, "cpu")]
    pinned = load_config(make_config(model={"quantization": {"compute_dtype": "bfloat16"}}))
    layers = [m for m in load_base_model(pinned.model).modules() if isinstance(m, Linear4bit)]
    assert layers[0].compute_dtype == torch.bfloat16  # an explicit dtype is honoured


def test_auto_compute_dtype_follows_the_device(monkeypatch):
    """auto: bfloat16 only where the CPU has bf16 matmul instructions (others emulate it many
    times slower); an explicit dtype is never changed."""
    import fashionfuse.base_model as bm
    from fashionfuse.config import QuantizationConfig

    avx2 = "processor : 0\nflags : fpu sse avx avx2 fma\n"
    assert not bm.cpu_has_native_bf16(avx2)
    assert bm.cpu_has_native_bf16(avx2.replace("avx2", "avx2 avx512f avx512_bf16"))
    assert bm.cpu_has_native_bf16(avx2.replace("fma", "fma amx_bf16 amx_tile"))
    auto, pinned = QuantizationConfig(), QuantizationConfig(compute_dtype="bfloat16")
    assert auto.compute_dtype == "auto"
    monkeypatch.setattr(bm, "cpu_has_native_bf16", lambda: False)
    assert bm.resolve_compute_dtype(auto, "cpu") == "float32"
    assert bm.resolve_compute_dtype(pinned, "cpu") == "bfloat16"
    monkeypatch.setattr(bm, "cpu_has_native_bf16", lambda: True)
    assert bm.resolve_compute_dtype(auto, "cpu") == "bfloat16"


def test_steps_and_packed_rows_cover_every_example_once():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47, 9, 46, 4, 45, 120, 3]
    windows = step_windows(len(lengths), 5, seed=0)
    assert sorted(i for w in windows for i in w) == list(range(len(lengths)))
    assert [len(w) for w in windows] == [5, 5, 4]
    rows = pack_rows(list(range(len(lengths))), lengths, capacity=128)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert len(rows) == math.ceil(sum(lengths) / 128)  # the minimum number of rows here
    plan = plan_micro_batches(list(range(len(lengths))), lengths, 2, pack_length=None)
    assert all(len(mb) <= 2 for mb in plan)
    widths = [[lengths[r[0]] for r in mb] for mb in plan]
    for this, nxt in zip(widths, widths[1:]):  # unpacked: short with short, long with long
        assert min(this) >= max(nxt)


def _examples(tokenizer, n: int) -> list[dict]:
    from fashionfuse.chat_template import tokenize_with_labels

    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": "what colour is the sky " * (1 + i % 3)},
                {"role": "assistant", "content": "blue and " * (1 + 2 * i % 5) + "grey"}]
        if i % 2:
            msgs += [{"role": "user", "content": "and grass?"},
                     {"role": "assistant", "content": "green"}]
        out.append(tokenize_with_labels(tokenizer, msgs, "You are FashionGPT.", 128))
    return out


def test_packed_loss_equals_one_by_one(tiny_model):
    """Packed rows (position resets, no attention mask) give the loss of each sample run alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    examples = _examples(tok, 7)
    lengths = [len(e["input_ids"]) for e in examples]
    rows = pack_rows(list(range(7)), lengths, capacity=3 * max(lengths))
    assert any(len(r) > 1 for r in rows)
    packed = collate_packed([[examples[i] for i in r] for r in rows], tok.pad_token_id)
    with torch.no_grad():
        packed_sum, packed_n = token_losses(model, packed)
        alone = [token_losses(model, collate([e], tok.pad_token_id)) for e in examples]
        padded_sum, _ = token_losses(model, collate(examples, tok.pad_token_id))
    assert packed_n == sum(n for _, n in alone)
    torch.testing.assert_close(packed_sum, sum(s for s, _ in alone), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(padded_sum, sum(s for s, _ in alone), rtol=1e-4, atol=1e-3)
    # logits of every packed sample equal its logits alone; without the position resets the
    # samples would attend to each other and the logits would move
    row = [examples[i] for i in rows[0]]
    assert len(row) > 1
    one_row = collate_packed([row], tok.pad_token_id)
    leaky = dict(one_row, position_ids=torch.arange(one_row["input_ids"].shape[1])[None])
    with torch.no_grad():
        packed_logits = model(input_ids=one_row["input_ids"], position_ids=one_row["position_ids"], use_cache=False).logits[0]
        leaky_logits = model(input_ids=leaky["input_ids"], position_ids=leaky["position_ids"], use_cache=False).logits[0]
        at, worst_packed, worst_leaky = 0, 0.0, 0.0
        for e in row:
            n = len(e["input_ids"])
            alone_logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            if at:  # the first sample sees no other in either layout
                worst_packed = max(worst_packed, float((packed_logits[at:at + n] - alone_logits).abs().max()))
                worst_leaky = max(worst_leaky, float((leaky_logits[at:at + n] - alone_logits).abs().max()))
            at += n
    assert worst_packed < 1e-4
    assert worst_leaky > 100 * max(worst_packed, 1e-6)
    # the per-example attention used for packed training gives the same logits and loss
    from fashionfuse.train.varlen_attention import use_varlen_attention

    assert use_varlen_attention(model) == "fashionfuse_varlen"
    with torch.no_grad():
        varlen_logits = model(input_ids=one_row["input_ids"], position_ids=one_row["position_ids"],
                              use_cache=False).logits[0]
        varlen_sum, _ = token_losses(model, packed)
    torch.testing.assert_close(varlen_logits, packed_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(varlen_sum, packed_sum, rtol=1e-4, atol=1e-3)
    with torch.no_grad():  # one flattened row: vocabulary projection only where tokens train
        flat_sum, flat_n = token_losses(model, collate_packed([examples], tok.pad_token_id))
    assert flat_n == packed_n
    torch.testing.assert_close(flat_sum, packed_sum, rtol=1e-4, atol=1e-3)


def test_collate_pads_and_masks():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                     {"input_ids": [1, 4], "labels": [-100, 4]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 4, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 4, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_interrupted_training_resumes_to_the_same_adapter(make_config, tmp_path):
    from transformers import AutoTokenizer

    path = make_config(training={"max_steps": 4, "checkpoint_steps": 2, "lora": {"r": 4, "alpha": 8},
                                 "learning_rate": 5e-3, "batch_size": 8, "micro_batch_size": 4})
    assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
    cfg = load_config(path)
    tok = AutoTokenizer.from_pretrained(cfg.model.base)
    with pytest.raises(KeyboardInterrupt):
        train_one_adapter(cfg, "orca", tok, progress=stop_after(2))
    work = tmp_path / "run" / "adapters" / ".orca.work"
    assert (work / "checkpoint" / "state.pt").exists()
    assert not (tmp_path / "run" / "adapters" / "orca").exists()  # nothing half-written
    result = runner.invoke(app, ["train-adapter", str(path), "--dataset", "orca"])
    assert result.exit_code == 0, result.output
    assert "resuming from step 2/4" in result.output
    resumed = load_file(tmp_path / "run" / "adapters" / "orca" / "adapter_model.safetensors")
    history = [json.loads(x) for x in
               (tmp_path / "run/adapters/orca/metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]

    fresh = make_config(run_dir=tmp_path / "fresh", training={
        "max_steps": 4, "checkpoint_steps": 2, "lora": {"r": 4, "alpha": 8}, "learning_rate": 5e-3,
        "batch_size": 8, "micro_batch_size": 4})
    assert runner.invoke(app, ["curate", str(fresh)]).exit_code == 0
    assert runner.invoke(app, ["train-adapter", str(fresh), "--dataset", "orca"]).exit_code == 0
    straight = load_file(tmp_path / "fresh" / "adapters" / "orca" / "adapter_model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-6)


def test_train_skips_up_to_date_adapter(pipeline_run):
    result = runner.invoke(app, ["train-adapter", str(pipeline_run["config"])])
    assert result.exit_code == 0
    assert "train chat: up to date" in result.output and "train orca: up to date" in result.output


def test_train_without_curated_data_fails_clearly(make_config):
    result = runner.invoke(app, ["train-adapter", str(make_config())])
    assert result.exit_code == 2
    assert "curated data missing" in result.output


def test_non_finite_loss_stops_with_the_step(make_config, monkeypatch, tmp_path):
    from transformers import AutoTokenizer

    from fashionfuse.train import trainer
    from fashionfuse.train.trainer import TrainingError

    path = make_config()
    assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
    cfg = load_config(path)
    calls = {"n": 0}
    real = trainer.token_losses

    def poisoned(model, batch):
        calls["n"] += 1
        loss, n = real(model, batch)
        return (loss * float("nan"), n) if calls["n"] > 1 else (loss, n)

    monkeypatch.setattr(trainer, "token_losses", poisoned)
    with pytest.raises(TrainingError, match=r"train orca: loss is nan at step [0-9]+; stopping"):
        train_one_adapter(cfg, "orca", AutoTokenizer.from_pretrained(cfg.model.base))
    assert not (tmp_path / "run" / "adapters" / "orca").exists()  # nothing written


def test_table8_baselines_fused_dataset_and_sequential(make_config, tmp_path):
    """One adapter on concatenated datasets; one trained on top of another (saved together)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = make_config(adapters=[
        {"name": "both", "datasets": ["chat", "orca"]},
        {"name": "orca_after_chat", "datasets": ["orca"], "on_top_of": ["chat"]},
    ], training={"batch_size": 8, "micro_batch_size": 4, "max_steps": 2, "learning_rate": 5e-3,
                 "lora": {"r": 4, "alpha": 8}})
    assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
    result = runner.invoke(app, ["train-adapter", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run" / "adapters"
    m = {n: json.loads((run / n / "manifest.json").read_text()) for n in
         ("chat", "orca", "both", "orca_after_chat")}
    assert m["both"]["metrics"]["examples"] == m["chat"]["metrics"]["examples"] + m["orca"]["metrics"]["examples"]
    assert len(m["both"]["inputs"]) == 2
    seq = json.loads((run / "orca_after_chat" / "adapter_config.json").read_text())
    assert seq["r"] == 8  # chat's rank 4 + the new rank 4, one exact concatenated LoRA
    chat = load_file(run / "chat" / "adapter_model.safetensors")
    both = load_file(run / "orca_after_chat" / "adapter_model.safetensors")
    key = next(k for k in chat if "lora_A" in k)
    torch.testing.assert_close(both[key][:4], chat[key].float())  # chat's A rows come first
    assert not torch.equal(both[key][4:], load_file(run / "orca" / "adapter_model.safetensors")[key].float())
    base = AutoModelForCausalLM.from_pretrained(load_config(path).model.base)
    model = PeftModel.from_pretrained(base, run / "orca_after_chat")
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_ddp_training_on_two_cpu_processes_matches_one_process(make_config, tmp_path):
    """torchrun x2 (gloo): each process trains on half of every step; the result equals one
    process on the whole step (token-weighted loss, dropout off)."""
    train = {"batch_size": 8, "micro_batch_size": 2, "max_steps": 3, "learning_rate": 5e-3,
             "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "checkpoint_steps": 2}
    single = make_config(run_dir=tmp_path / "single", training=train)
    assert runner.invoke(app, ["curate", str(single)]).exit_code == 0
    assert runner.invoke(app, ["train-adapter", str(single), "--adapter", "orca"]).exit_code == 0
    multi = make_config(run_dir=tmp_path / "multi", training=train)
    assert runner.invoke(app, ["curate", str(multi)]).exit_code == 0
    # gloo on the CPU even where one GPU is visible (two processes cannot share it with NCCL)
    env = dict(os.environ, OMP_NUM_THREADS="1", FASHIONFUSE_DIST_BACKEND="gloo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", "-m", "fashionfuse", "train-adapter", str(multi),
           "--adapter", "orca"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "on 2 process(es)" in proc.stdout
    manifest = json.loads((tmp_path / "multi/adapters/orca/manifest.json").read_text())
    assert manifest["metrics"]["processes"] == 2
    one = load_file(tmp_path / "single/adapters/orca/adapter_model.safetensors")
    two = load_file(tmp_path / "multi/adapters/orca/adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key].float(), one[key].float(), rtol=2e-2, atol=2e-4)


def test_reductions_run_on_the_process_device():
    """all_sum's tensor lives where the process group can reduce it (cuda:N under NCCL)."""
    from fashionfuse.train.distributed import World, reduction_tensor

    t = reduction_tensor(World(rank=1, size=2, device="meta"), [1.0, 2.0])
    assert t.device.type == "meta" and t.dtype == torch.float64
    assert reduction_tensor(World(rank=0, size=2, device="cpu"), [3.0]).device.type == "cpu"


def test_validation_curve_is_measured_and_changes_no_weight(make_config, tmp_path):
    """`training.eval_steps`: the validation loss at the steps asked for and the last, equal to
    the saved adapter's loss on those records; the weights equal a run without the curve."""
    from peft import PeftModel

    from fashionfuse.base_model import load_base_model, load_tokenizer
    from fashionfuse.examples import load_records, tokenize_records

    weights = {}
    for every in (0, 3):
        path = make_config(run_dir=tmp_path / f"every{every}", training={
            "max_steps": 4, "eval_steps": every, "eval_samples": 5, "lora": {"r": 4, "alpha": 8},
            "learning_rate": 5e-3, "batch_size": 8, "micro_batch_size": 4})
        assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
        result = runner.invoke(app, ["train-adapter", str(path), "--dataset", "orca"])
        assert result.exit_code == 0, result.output
        out = tmp_path / f"every{every}" / "adapters" / "orca"
        weights[every] = load_file(out / "adapter_model.safetensors")
        history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        measured = [h["step"] for h in history if "val_loss" in h]
        assert measured == ([] if every == 0 else [3, 4])
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[3][key]), key

    cfg = load_config(path)
    tok = load_tokenizer(cfg.model)
    examples = tokenize_records(load_records(tmp_path / "every3/curate/orca/validation.jsonl", 5),
                                tok, cfg.model.system_message, cfg.model.max_input_len)
    model = PeftModel.from_pretrained(load_base_model(cfg.model, device="cpu"), str(out)).eval()
    with torch.no_grad():
        total, n = token_losses(model, collate(examples, tok.pad_token_id))
    assert history[-1]["val_loss"] == pytest.approx(float(total) / n, rel=2e-3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["val_loss"] == history[-1]["val_loss"]
