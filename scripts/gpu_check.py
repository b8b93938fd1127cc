"""The GPU check: one prepared script that tells whether fashionfuse's GPU path is right and fast.

    bash scripts/gpu_wheels.sh                       # once, on a machine with registry access
    pip install --no-index --find-links .whl bitsandbytes pydantic   # on the GPU machine
    PYTHONPATH=src python scripts/gpu_check.py       # sized for 8 min on one H100 (not yet run on one)
    python scripts/gpu_check.py --dry-run            # every step on a tiny model on the CPU

It prints one report, a `name: value` line per figure (read by the docs and the CPU test):
  1. versions (torch, CUDA, bitsandbytes, flash-attn, Liger, transformers, PEFT), the device,
     and the dtype policy resolved for it (compute dtype, autocast, attention);
  2. packed attention (`varlen_attention`, float32 inputs as after k-bit preparation) against
     per-example float32 attention at 4k and 8k tokens: the largest difference, peak memory,
     and whether it ran with SDPA's math kernel forbidden (no float32 math-kernel attention);
  3. QLoRA training of a Llama-3-8B-shaped model (random weights, `--layers` decoder layers at
     full width, 128,256-token vocabulary; four ~1k-token examples a step, packed into 4k-token
     rows by fashionfuse, padded micro-batches of 4 for the baseline) by fashionfuse and by HF
     `Trainer` + PEFT with `bf16=True`, SDPA, paged AdamW and the same gradient checkpointing,
     LoRA and batch, each in its own process: tokens/s of each and the ratio, peak GPU memory of
     each and the ratio; and, from a second fashionfuse run with twice the layers, the peak
     projected to Llama-3-8B's 32 layers against 24 GB;
  4. resume: a small run stopped after its checkpoint and resumed equals the uninterrupted run;
  5. eval with `batch_size: auto` on the small model (lm-eval installed): lm-eval out-of-memory
     probes run, tokens/s;
  6. Liger's fused cross-entropy agreement check (liger-kernel installed, CUDA): the loss path
     training took;
  7. three adapters trained in one process: allocated GPU memory, live 4-bit weights and
     bitsandbytes' paged tensors after each (flat when nothing leaks).
A step that fails prints `FAILED` with the reason and the check goes on; the exit code is 1 if
any step failed. `--dry-run` runs the same steps at tiny sizes on the CPU (`make bench-smoke`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

TOKENIZER = ROOT / "data" / "tiny-llama"  # any tokenizer within the vocabulary serves
FAILED: list[str] = []


def say(name: str, value) -> None:
    print(f"{name}: {value}", flush=True)


@contextlib.contextmanager
def step(title: str):
    print(f"\n== {title}", flush=True)
    start = time.perf_counter()
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the check reports every step
        FAILED.append(title)
        print(f"FAILED: {title}: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc(limit=6)
    finally:
        print(f"({time.perf_counter() - start:.1f} s)", flush=True)


# --------------------------------------------------------------------------- sizes
def sizes(dry_run: bool, layers: int) -> dict:
    """Model and data sizes: Llama-3-8B's widths on a GPU, a tiny Llama on the dry run."""
    if dry_run:
        return {"hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 2048,
                "layers": 2, "example_tokens": 120, "micro": 4, "steps": 3, "r": 8,
                "attention_lengths": [256, 512], "small_hidden": 64, "device": "cpu"}
    return {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256,
            "layers": layers, "example_tokens": 1000, "micro": 4, "steps": 10, "r": 64,
            "attention_lengths": [4096, 8192], "small_hidden": 256, "device": "cuda"}


def llama_dir(out: Path, s: dict, layers: int, hidden: int | None = None) -> Path:
    """A random-weight Llama of these widths (bfloat16 on disk) with the tiny tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hidden = hidden or s["hidden"]
    big = hidden == s["hidden"]
    cfg = LlamaConfig(vocab_size=s["vocab"] if big else 2048, hidden_size=hidden,
                      intermediate_size=s["intermediate"] if big else hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=s["heads"] if big else 4,
                      num_key_value_heads=s["kv_heads"] if big else 2,
                      max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(s["device"]):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(out)
    del model
    release()
    return out


def chats(n: int, tokens: int, seed: int = 0) -> list[dict]:
    """Chats of about `tokens` tokens each (one exchange, a long answer)."""
    rng = random.Random(seed)
    words = "red blue green the a of and is to in it dog cat bird cow duck fast slow".split()
    out = []
    for _ in range(n):
        answer = " ".join(rng.choice(words) for _ in range(int(tokens * rng.uniform(0.35, 0.5))))
        out.append({"messages": [{"role": "user", "content": "say " + rng.choice(words)},
                                 {"role": "assistant", "content": answer}]})
    return out


def run_config(run_dir: Path, base: Path, s: dict, steps: int, **training):
    """A run config for `base` with one curated dataset `chat` written straight to its split."""
    from fashionfuse.config import RunConfig

    split = run_dir / "curate" / "chat" / "train.jsonl"
    split.parent.mkdir(parents=True, exist_ok=True)
    if not split.exists():
        examples = chats(s["micro"] * steps, s["example_tokens"])
        split.write_text("".join(json.dumps(e) + "\n" for e in examples))
    data = {"run_dir": str(run_dir), "seed": 0, "report_to": [],  # no tensorboard there
            "model": {"base": str(base), "max_input_len": s["example_tokens"] + 24},
            "datasets": [{"name": "chat", "kind": "chat",
                          "source": {"format": "messages", "path": str(split)}}],
            "training": {"batch_size": s["micro"], "micro_batch_size": s["micro"],
                         "max_steps": steps, "learning_rate": 1e-4, "eval_steps": 0,
                         "gradient_checkpointing": True, "checkpoint_steps": 1000,
                         "lora": {"r": s["r"], "alpha": 16, "dropout": 0.05}, **training}}
    return RunConfig.model_validate(data)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _without_plots() -> None:
    """matplotlib is not on a bare GPU machine: the loss plot is skipped there (said once)."""
    if importlib.util.find_spec("matplotlib") is None:
        from fashionfuse.train import trainer

        trainer._plot_loss = lambda *a, **k: None
        print("note: matplotlib absent, adapters are saved without loss.png")


# --------------------------------------------------------------------------- 1. versions
def report_versions(device: str) -> None:
    from importlib import metadata

    from fashionfuse.base_model import resolve_compute_dtype
    from fashionfuse.config import QuantizationConfig
    from fashionfuse.devices import (attention_dtype, detect, flash_attention_usable,
                                     training_precision)

    for package in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "flash-attn",
                    "liger-kernel", "lm-eval"):
        try:
            say(f"version_{package}", metadata.version(package))
        except metadata.PackageNotFoundError:
            say(f"version_{package}", "not installed")
    say("cuda", torch.version.cuda if torch.cuda.is_available() else "not available")
    cap = detect(device)
    say("device", cap.name or cap.kind)
    say("capability", f"{cap.kind} arch={cap.cuda_arch} bf16_native={cap.bf16_native} "
        f"flash_attn={cap.flash_attn}")
    dtype = resolve_compute_dtype(QuantizationConfig(), device)
    say("compute_dtype_auto", dtype)
    say("precision", training_precision(dtype, cap, None).describe())
    say("packed_attention", "flash_attention_2" if flash_attention_usable(cap) else
        f"fashionfuse_varlen in {str(attention_dtype(torch.float32, cap, dtype))[6:]}")


# --------------------------------------------------------------------------- 2. attention
def check_attention(s: dict, device: str) -> None:
    """varlen_attention on float32 q/k/v (as after k-bit preparation) against per-example
    float32 attention, with SDPA's math kernel forbidden on CUDA."""
    import types

    import torch.nn.functional as F

    from fashionfuse.base_model import resolve_compute_dtype
    from fashionfuse.config import QuantizationConfig
    from fashionfuse.devices import attention_dtype, detect
    from fashionfuse.train.varlen_attention import varlen_attention

    cap = detect(device)
    compute_in = attention_dtype(torch.float32, cap, resolve_compute_dtype(QuantizationConfig(),
                                                                           device))
    module = types.SimpleNamespace(is_causal=True, training=True)
    heads, kv, dim = s["heads"], s["kv_heads"], s["hidden"] // s["heads"]
    for length in s["attention_lengths"]:
        gen = torch.Generator().manual_seed(length)
        sizes, left = [], length
        while left > 0:
            sizes.append(min(left, random.Random(left).randint(length // 8, length // 3)))
            left -= sizes[-1]
        positions = torch.cat([torch.arange(n) for n in sizes])[None].to(device)
        q = torch.randn(1, heads, length, dim, generator=gen).to(device).requires_grad_()
        k = torch.randn(1, kv, length, dim, generator=gen).to(device).requires_grad_()
        v = torch.randn(1, kv, length, dim, generator=gen).to(device).requires_grad_()
        forbid = contextlib.nullcontext()
        if cap.cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            forbid = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                  SDPBackend.EFFICIENT_ATTENTION])
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with forbid:
            out, _ = varlen_attention(module, q, k, v, None, position_ids=positions,
                                      compute_in=None if compute_in == torch.float32
                                      else compute_in)
            out.float().square().sum().backward()
        peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20 if cap.cuda else None
        with torch.no_grad():  # the reference: each example's causal block in float32
            ref, start = [], 0
            for n in sizes:
                sl = slice(start, start + n)
                ref.append(F.scaled_dot_product_attention(
                    q[:, :, sl], k[:, :, sl].repeat_interleave(heads // kv, 1),
                    v[:, :, sl].repeat_interleave(heads // kv, 1), is_causal=True))
                start += n
            ref = torch.cat(ref, dim=2).transpose(1, 2)
        say(f"attention_{length}_examples", len(sizes))
        say(f"attention_{length}_dtype", str(compute_in)[6:])
        say(f"attention_{length}_max_abs_diff", f"{(out.float() - ref).abs().max().item():.4g}")
        if peak is not None:
            say(f"attention_{length}_peak_mib", f"{peak:.0f}")
            say(f"attention_{length}_math_kernel_float32_scores_mib",
                f"{heads * max(sizes) ** 2 * 4 / 2 ** 20:.0f} (per example, avoided)")
        say(f"attention_{length}_math_kernel_forbidden", "yes" if cap.cuda else "n/a (CPU)")
        del q, k, v, out, ref
        release()


# --------------------------------------------------------------------------- 3. training
def _peak(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    from bench_train import _vm_hwm_mib

    return _vm_hwm_mib()


def train_fashionfuse(cfg) -> dict:
    """In a child: fashionfuse's training of `chat`; tokens/s and peak memory."""
    from fashionfuse.base_model import load_tokenizer
    from fashionfuse.train.trainer import train_one_adapter

    _without_plots()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    metrics = train_one_adapter(cfg, "chat", load_tokenizer(cfg.model))
    return {"tokens_per_s": metrics["real_tokens"] / metrics["train_seconds"],
            "peak_mib": _peak(device), "loss": metrics["final_loss"],
            "precision": metrics["precision"], "attention": metrics["attention"],
            "loss_path": metrics["loss"], "padding_pct": metrics["padding_pct"]}


def train_baseline(cfg) -> dict:
    """In a child: HF Trainer + PEFT, the QLoRA recipe (bf16=True, SDPA, paged AdamW), on the
    same tokenised examples in padded micro-batches, the same LoRA and checkpointing."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                              Trainer, TrainingArguments)

    from fashionfuse.base_model import load_tokenizer
    from fashionfuse.examples import load_records, tokenize_records

    cuda = torch.cuda.is_available()
    tok = load_tokenizer(cfg.model)
    t = cfg.training
    examples = tokenize_records(load_records(Path(cfg.run_dir) / "curate/chat/train.jsonl"), tok,
                                cfg.model.system_message, cfg.model.max_input_len,
                                cfg.model.chat_template)
    dtype = torch.bfloat16 if cuda else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(cfg.model.base, quantization_config=quant,
                                                 dtype=dtype, attn_implementation="sdpa",
                                                 device_map={"": 0 if cuda else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha,
                                             lora_dropout=t.lora.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    seq2seq = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    counted = {"real": 0}

    def collator(features):
        batch = seq2seq(features)
        counted["real"] += int(batch["attention_mask"].sum())
        return batch

    args = TrainingArguments(
        output_dir=str(Path(cfg.run_dir) / "hf"), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.batch_size // t.micro_batch_size, max_steps=t.max_steps,
        learning_rate=t.learning_rate, max_grad_norm=t.max_grad_norm, bf16=cuda,
        optim="paged_adamw_32bit" if cuda else "adamw_torch", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1000,
        save_strategy="no", report_to="none", use_cpu=not cuda, remove_unused_columns=False,
        seed=0, disable_tqdm=True, dataloader_num_workers=0)
    data = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    start = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": counted["real"] / seconds, "peak_mib": _peak("cuda" if cuda else "cpu"),
            "loss": out.training_loss}


def check_training(s: dict, work: Path, layers: int) -> None:
    from bench_train import in_child

    base = llama_dir(work / "model", s, s["layers"])
    sides = {}
    for side, fn in (("baseline", train_baseline), ("fashionfuse", train_fashionfuse)):
        cfg = run_config(work / f"run-{side}", base, s, s["steps"])
        result, error, _ = in_child(fn, cfg)
        if error:
            raise RuntimeError(f"{side}: {error}")
        sides[side] = result
        say(f"train_{side}_tokens_per_s", f"{result['tokens_per_s']:.0f}")
        say(f"train_{side}_peak_mib", f"{result['peak_mib']:.0f}")
        say(f"train_{side}_loss", f"{result['loss']:.4f}")
    ff = sides["fashionfuse"]
    say("train_fashionfuse_precision", ff["precision"])
    say("train_fashionfuse_attention", ff["attention"])
    say("train_fashionfuse_loss_path", ff["loss_path"] or "chunked head")
    say("train_fashionfuse_padding_pct", ff["padding_pct"])
    say("train_tokens_per_s_ratio", f"{ff['tokens_per_s'] / sides['baseline']['tokens_per_s']:.2f}"
        " (target >= 1.5 on the GPU)")
    say("train_peak_memory_ratio", f"{ff['peak_mib'] / sides['baseline']['peak_mib']:.2f}"
        " (target <= 1.0)")
    # the peak per decoder layer, from a run with twice the layers: projected to 32 layers
    deeper = llama_dir(work / "model-deeper", s, 2 * s["layers"])
    result, error, _ = in_child(train_fashionfuse,
                                run_config(work / "run-deeper", deeper, s, 2))
    if error:
        raise RuntimeError(f"deeper run: {error}")
    per_layer = (result["peak_mib"] - ff["peak_mib"]) / s["layers"]
    projected = ff["peak_mib"] + per_layer * (32 - s["layers"])
    say("train_peak_mib_per_layer", f"{per_layer:.0f}")
    say("train_8b_projected_peak_gib", f"{projected / 1024:.1f} (32 layers; target <= 24)")


# --------------------------------------------------------------------------- 4-7. small model
def check_resume(s: dict, work: Path, small: Path) -> None:
    """Stopped after its step-2 checkpoint and resumed == the uninterrupted run."""
    from safetensors.torch import load_file

    from fashionfuse.base_model import load_tokenizer
    from fashionfuse.train.trainer import train_one_adapter

    _without_plots()
    weights = {}
    for name in ("straight", "resumed"):
        cfg = run_config(work / f"resume-{name}", small, s, 4, checkpoint_steps=2,
                         lora={"r": 8, "alpha": 16, "dropout": 0.0})
        tok = load_tokenizer(cfg.model)
        if name == "resumed":
            def stop(done):
                if done == 2:
                    raise KeyboardInterrupt

            with contextlib.suppress(KeyboardInterrupt):
                train_one_adapter(cfg, "chat", tok, progress=stop)
            release()
        train_one_adapter(cfg, "chat", tok)
        weights[name] = load_file(Path(cfg.run_dir) / "adapters/chat/adapter_model.safetensors")
        release()
    diff = max((weights["straight"][k].float() - weights["resumed"][k].float()).abs().max().item()
               for k in weights["straight"])
    say("resume_max_abs_diff", f"{diff:.3g}")
    if not diff < 1e-3:
        raise AssertionError(f"the resumed adapter differs from the uninterrupted one by {diff}")


def check_eval(s: dict, work: Path, small: Path) -> None:
    if importlib.util.find_spec("lm_eval") is None:
        say("eval", "skipped: lm-eval not installed here (pip install lm-eval, where a "
            "registry is reachable)")
        return
    from lm_eval.models.huggingface import HFLM

    from fashionfuse.config import RunConfig
    from fashionfuse.demo import write_eval_tasks
    from fashionfuse.evaluate import evaluate

    probes = []
    original = HFLM._detect_batch_size

    def counted(self, *args, **kwargs):
        probes.append(1)
        return original(self, *args, **kwargs)

    HFLM._detect_batch_size = counted
    tasks = work / "tasks"
    write_eval_tasks(tasks)
    cfg = RunConfig.model_validate({
        "run_dir": str(work / "eval-run"), "model": {"base": str(small), "max_input_len": 256},
        "datasets": [{"name": "chat", "kind": "chat",
                      "source": {"format": "messages", "path": str(work / "x.jsonl")}}],
        "report_to": [],
        "eval": {"tasks": ["demo_colours", "demo_opposites"], "include_paths": [str(tasks)],
                 "batch_size": "auto", "num_fewshot": 0, "models": ["base"]}})
    start = time.perf_counter()
    try:
        evaluate(cfg, models={"base": None})
    finally:
        HFLM._detect_batch_size = original
    seconds = time.perf_counter() - start
    timings = json.loads((work / "eval-run/eval/timings.json").read_text())
    tokens = sum(timings["tokens_through_model"].values())
    scoring = sum(timings["models_s"].values())
    say("eval_lm_eval_probes", len(probes))
    say("eval_seconds", f"{seconds:.1f} (scoring {scoring:.1f})")
    say("eval_tokens_per_s", f"{tokens / max(scoring, 1e-9):.0f}")


def check_three_adapters(s: dict, work: Path, small: Path) -> None:
    """Three adapters in one process: what stays allocated after each."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from fashionfuse.config import RunConfig
    from fashionfuse.train.trainer import train_adapters

    _without_plots()
    cfg = run_config(work / "three", small, s, 2)
    data = cfg.model_dump(mode="json")
    split = Path(cfg.run_dir) / "curate" / "chat" / "train.jsonl"
    for name in ("two", "three"):
        (split.parent.parent / name).mkdir(exist_ok=True)
        (split.parent.parent / name / "train.jsonl").write_text(split.read_text())
        data["datasets"].append({**data["datasets"][0], "name": name})
    cfg = RunConfig.model_validate(data)
    import fashionfuse.train.trainer as trainer

    after = []
    original = trainer.train_one_adapter

    def watched(*args, **kwargs):
        out = original(*args, **kwargs)
        gc.collect()
        live_4bit = sum(isinstance(o, bnb.nn.Params4bit) for o in gc.get_objects())
        allocated = torch.cuda.memory_allocated() / 2 ** 20 if torch.cuda.is_available() else 0.0
        after.append((allocated, live_4bit,
                      len(bnbf.GlobalPageManager.get_instance().paged_tensors)))
        return out

    trainer.train_one_adapter = watched
    try:
        train_adapters(cfg, ["chat", "two", "three"])
    finally:
        trainer.train_one_adapter = original
    for k, (allocated, live, paged) in enumerate(after, 1):
        say(f"after_adapter_{k}", f"allocated {allocated:.0f} MiB, live 4-bit weights {live}, "
            f"paged tensors {paged}")
    if any(live for _, live, _ in after) or after[-1][2] > after[0][2]:
        raise AssertionError("memory of finished adapters is still held")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="every step on a tiny model on the CPU (no GPU needed)")
    parser.add_argument("--layers", type=int, default=2,
                        help="decoder layers of the 8B-shaped model (full width)")
    parser.add_argument("--only", default=None,
                        help="comma-separated steps: versions,attention,train,resume,eval,adapters")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run")
    s = sizes(args.dry_run, args.layers)
    device = "cuda:0" if s["device"] == "cuda" else "cpu"
    wanted = set((args.only or "versions,attention,train,resume,eval,adapters").split(","))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "versions" in wanted:
            with step("1. versions and dtype policy"):
                report_versions(device)
        if "attention" in wanted:
            with step("2. packed attention"):
                check_attention(s, device)
        if "train" in wanted:
            with step("3. QLoRA training, 8B-shaped: fashionfuse vs HF Trainer + PEFT"):
                check_training(s, work, args.layers)
        small = llama_dir(work / "small", s, 2, hidden=s["small_hidden"])
        if "resume" in wanted:
            with step("4. resume from a checkpoint"):
                check_resume(s, work, small)
        if "eval" in wanted:
            with step("5. eval with batch_size: auto"):
                check_eval(s, work, small)
        if "adapters" in wanted:
            with step("6-7. Liger check and three adapters in one process"):
                if importlib.util.find_spec("liger_kernel") is None:
                    say("liger", "not installed: the chunked head (pip install "
                        "'fashionfuse[cuda]')")
                check_three_adapters(s, work, small)
    print(f"\ngpu_check: {'FAILED ' + ', '.join(FAILED) if FAILED else 'all steps passed'} "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
