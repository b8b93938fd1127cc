"""Benchmark adapter training: a plain HF Trainer + PEFT setup against fashionfuse, in one run.

    python scripts/bench_train.py [--records 600] [--epochs 1]
    python scripts/bench_train.py --model smollm2 [--records 96]   # a real model on real data
    python scripts/bench_train.py --model smollm2 --memory-cap 6   # + 8 x 1,024 under 6 GB

Both train the same QLoRA adapter (4-bit NF4 base = the demo tiny Llama or a random Llama of
`--size`; same LoRA, lr, steps, samples per optimiser step) on the same mixed-length chat data
(lengths log-normal, as in real chat dumps). The baseline is what most scripts do: HF
`Trainer`, random batches padded to their longest sample (`DataCollatorForSeq2Seq`), bfloat16
compute as in the QLoRA recipe. fashionfuse packs each step's samples into rows without
attention across them and uses its default `compute_dtype: auto` (bfloat16 where the device
computes in it natively, float32 on CPUs that only emulate it; `--compute-dtype bfloat16`
measures packing alone). Printed: real (non-padding) tokens per second of each and their ratio,
the share of computed positions that were padding, the peak RSS of each side (each trains in
its own spawned process; the kernel's high-water mark, VmHWM) and their ratio, and the final
per-token loss of each adapter on the same held-out chats (both evaluated the same way).
`--memory-cap GB` then trains one `--cap-batch` micro-batch (default 8 x 1,024 tokens) on each
side, gradient checkpointing on for both: uncapped (peak RSS of each, and their ratio) and
under an address-space cap (RLIMIT_AS) of GB, printing whether each side fits. The baseline
there is PEFT's own LoRA layers with the model's own loss (what HF's Trainer calls), against
fashionfuse's loss through the chunked output head (`head_loss.py`).
`--repeats N` trains both sides N times, alternating, and reports the median tokens/s of each
(and each pair's ratio): the speed of this shared machine drifts by tens of percent from one
minute to the next. `--profile N` then profiles N fashionfuse steps and prints where the time
goes.

`--model smollm2` trains on SmolLM2-135M-Instruct (its GGUF file, fetched into the cache by
scripts/fetch_smollm2.py) in its own ChatML template, on real instructions from ../shared/raw
(GPTeacher code and GSM8K maths, alternating), both sides in `--baseline-dtype`. Every run also
prints each side's model FLOPs utilisation: 6 x parameters x trained tokens per second (the
PaLM convention: it counts the frozen weights' gradient FLOPs that LoRA skips, and no attention
FLOPs) over this machine's float32 matmul peak, and over its bfloat16 peak (a CPU with AMX
multiplies bfloat16 several times faster than float32), both measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data" / "tiny-llama"
WORDS = ("red blue green yellow purple orange black white pink brown the a of and is to in it "
         "that was for on are with as his they be at one have this from or had by hot cold big "
         "small fast slow happy sad dog cat bird cow duck moo woof tweet quack").split()


def synthetic_chats(n: int, seed: int, mix: str = "lognormal") -> list[dict]:
    """Chats whose lengths follow a log-normal law (many short, a few long), 1-3 turns; with
    `mix="padding30"` one turn of a narrower log-normal length (about 30 % padding in random
    batches of 4, the share measured on a real held-out instruction set)."""
    rng = random.Random(seed)
    turns, sigma = ([1, 1, 2, 3], 0.9) if mix == "lognormal" else ([1], 0.6)
    out = []
    for _ in range(n):
        msgs = []
        for _turn in range(rng.choice(turns)):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            n_words = int(min(300, max(2, rng.lognormvariate(math.log(30), sigma))))
            a = " ".join(rng.choice(WORDS[:20]) for _ in range(n_words))
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"messages": msgs})
    return out


@contextmanager
def peak_rss(into: dict, key: str, every_s: float = 0.05):
    """Record the peak resident set size (MiB) of this process while the block runs, sampled
    from /proc/self/statm (Linux; elsewhere the process-lifetime peak from getrusage). The
    baseline runs first; memory it freed but the allocator kept counts in the second figure."""
    page = os.sysconf("SC_PAGE_SIZE")
    stop = threading.Event()
    peak = [0]

    def sample():
        while not stop.is_set():
            try:
                with open("/proc/self/statm") as fh:
                    peak[0] = max(peak[0], int(fh.read().split()[1]) * page)
            except OSError:
                import resource
                peak[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            stop.wait(every_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        into[key] = peak[0] / 2 ** 20


def _child_entry(fn, args, cap_bytes, queue) -> None:
    """In the child: cap the address space (RLIMIT_AS) if asked, run fn, report its result
    and the process's peak RSS (VmHWM, the kernel's own high-water mark)."""
    import resource

    if cap_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))
    try:
        result, error = fn(*args), None
    except (MemoryError, RuntimeError) as exc:  # torch: "can't allocate memory" under the cap
        result, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    queue.put((result, error, _vm_hwm_mib()))


def _vm_hwm_mib() -> float:
    """This process's peak resident set (MiB) from /proc/self/status (Linux), else getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(fn, *args, cap_gb: float | None = None, env: dict | None = None
             ) -> tuple[object, str | None, float]:
    """Run fn(*args) in a fresh (spawned) process, so each side's peak RSS is its own:
    (result, error or None, peak RSS MiB). Under `cap_gb` the child's address space is capped;
    an allocation past it fails (error) or the child dies (error with its exit code). `env`:
    the child's environment (an allocator is preloaded through it), else this process's."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_entry,
                       args=(fn, args, int(cap_gb * 2 ** 30) if cap_gb else None, queue))
    saved = dict(os.environ)
    try:  # a spawned child starts with the environment of this moment
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        proc.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    import queue as queues

    while True:  # a child killed outright (out of memory) never reports: watch it
        try:
            result, error, peak = queue.get(timeout=1.0)
            break
        except queues.Empty:
            if not proc.is_alive():
                try:
                    result, error, peak = queue.get_nowait()
                except queues.Empty:
                    result, error, peak = None, f"killed (exit code {proc.exitcode})", float("nan")
                break
    proc.join()
    return result, error, peak


def plain_peft_layers(model, lora) -> None:
    """PEFT's own LoRA forward and `nn.Dropout` on every layer, as plain setups have them
    (undoing fashionfuse's lean forward and cheap-mask dropout)."""
    from fashionfuse.adapters.runtime import lora_layers

    for module in lora_layers(model).values():
        module.__dict__.pop("forward", None)
        if lora.dropout > 0:
            module.lora_dropout["default"] = torch.nn.Dropout(lora.dropout)


def one_step(cfg, side: str, rows: int, width: int) -> dict:
    """One forward and backward of a [rows x width] micro-batch of random token ids, every
    position trained, gradient checkpointing on for both sides (the QLoRA recipe's setting at
    long contexts): `baseline` is PEFT's own LoRA layers and the model's own loss (what HF's
    Trainer calls), `fashionfuse` its training path (`token_losses`, the chunked head)."""
    from fashionfuse.head_loss import token_losses
    from fashionfuse.train.model import build_trainable_model

    t = cfg.training.model_copy(update={"packing": False, "gradient_checkpointing": True})
    model = build_trainable_model(cfg.model, t, device="cpu", log=lambda *_: None).model.train()
    if side == "baseline":
        plain_peft_layers(model, t.lora)
    torch.manual_seed(0)
    ids = torch.randint(10, model.get_input_embeddings().num_embeddings, (rows, width))
    start = time.perf_counter()
    if side == "baseline":
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    else:
        total, n = token_losses(model, {"input_ids": ids, "labels": ids,
                                        "attention_mask": torch.ones_like(ids)})
        loss = total / n
    loss.backward()
    return {"seconds": time.perf_counter() - start, "loss": float(loss.detach())}


def matmul_peak_flops(dtype=torch.float32, n: int = 2048, seconds: float = 3.0) -> float:
    """This machine's matmul rate in `dtype` (FLOP/s): the best of repeated n x n products."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best, spent = 0.0, 0.0
    while spent < seconds:
        start = time.perf_counter()
        a @ b
        took = time.perf_counter() - start
        spent += took
        best = max(best, 2 * n ** 3 / took)
    return best


def real_records(n: int, skip: int = 0) -> list[dict]:
    """Chats from ../shared/raw: GPTeacher code instructions and GSM8K problems, alternating."""
    raw = ROOT.parent / "shared" / "raw"
    if not (raw / "gsm8k_train.jsonl").is_file():
        raise SystemExit(f"--model smollm2 trains on real data in {raw}, which is absent")
    code = json.loads((raw / "gpteacher_codegen_sample.json").read_text())
    maths = [json.loads(x) for x in (raw / "gsm8k_train.jsonl").read_text().splitlines()]
    pairs = []
    for c, m in zip(code, maths):
        prompt = c["instruction"] + (f"\n\n{c['input']}" if c.get("input") else "")
        pairs += [(prompt, c["response"]), (m["question"], m["answer"])]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs[skip:skip + n]]


def print_profile(cfg, tok, steps: int) -> None:
    """Profile `steps` optimiser steps of fashionfuse's training (torch.profiler, CPU) and print
    the operators that take the most time, grouped into what they are for."""
    from torch.profiler import ProfilerActivity, profile

    from fashionfuse.train.trainer import train_one_adapter

    short = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"max_steps": steps})})
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_one_adapter(short, "chat", tok)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = {"LoRA dropout masks": ("bernoulli", "aten::rand", "aten::uniform", "aten::where",
                                     "aten::lt"),
              "4-bit dequantise (bitsandbytes)": ("dequant", "bitsandbytes"),
              "matmul (base + LoRA)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul",
                                      "aten::linear"),
              "attention": ("attention", "aten::_flash", "sdpa", "softmax"),
              "dtype casts and copies": ("aten::copy_", "aten::to", "aten::_to_copy"),
              "elementwise": ("aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::rsqrt",
                              "aten::mean", "aten::neg", "aten::cat", "aten::div")}
    share = dict.fromkeys(groups, 0.0)
    for e in events:
        for label, keys in groups.items():
            if any(k in e.key for k in keys):
                share[label] += e.self_cpu_time_total
                break
    print(f"profile of {steps} fashionfuse steps (self CPU time):")
    for label, t in sorted(share.items(), key=lambda kv: -kv[1]):
        print(f"  {label}: {100 * t / total:.1f} %")
    print(f"  other: {100 * (total - sum(share.values())) / total:.1f} %")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def held_out_loss(model_cfg, adapter_dir: Path, examples: list[dict], pad_id: int) -> float:
    """Mean per-token loss of an adapter on held-out examples (unpacked, batch 8)."""
    from peft import PeftModel

    from fashionfuse.base_model import load_base_model
    from fashionfuse.examples import collate
    from fashionfuse.head_loss import token_losses

    model = PeftModel.from_pretrained(load_base_model(model_cfg, device="cpu"), str(adapter_dir)).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            s, k = token_losses(model, collate(examples[i:i + 8], pad_id))
            total, n = total + float(s), n + k
    return total / n


def _parameter_count(cfg) -> int:
    """Parameters of the base model (embeddings counted once when tied), from its config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from fashionfuse.gguf_base import checkpoint_dir

    config = AutoConfig.from_pretrained(checkpoint_dir(cfg.model))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    out = model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and out is not None \
            and out.weight is not model.get_input_embeddings().weight:
        total -= out.weight.numel()  # one matrix in the checkpoint, untied on the meta device
    return total


def sharing_data(run: Path, other: Path) -> Path:
    """A second run dir `other` whose curated training data is `run`'s (linked)."""
    (other / "curate" / "chat").mkdir(parents=True)
    (other / "curate" / "chat" / "train.jsonl").symlink_to(run / "curate" / "chat" / "train.jsonl")
    return other


def baseline_model_cfg(cfg, dtype: str):
    """The run's model settings with the baseline's compute dtype (the QLoRA recipe's bfloat16,
    as plain scripts copy it)."""
    q = cfg.model.quantization.model_copy(update={"compute_dtype": dtype})
    return cfg.model.model_copy(update={"quantization": q})


def run_baseline(cfg, examples: list[dict], out: Path, steps: int, dtype: str) -> dict:
    """HF Trainer + PEFT: random batches padded to their longest sample."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from fashionfuse.allocator import active_allocator
    from fashionfuse.base_model import load_tokenizer
    from fashionfuse.train.model import build_trainable_model

    t = cfg.training
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(cfg.seed)
    # the plain setup: the model's own attention on padded batches (no packing)
    model = build_trainable_model(baseline_model_cfg(cfg, dtype),
                                  t.model_copy(update={"packing": False}), device="cpu").model
    plain_peft_layers(model, t.lora)
    seq2seq = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    counts = {"real": 0, "padded": 0}

    def collator(features):
        batch = seq2seq(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["padded"] += batch["input_ids"].numel()
        return batch

    args = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.batch_size // t.micro_batch_size, max_steps=steps,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio, max_grad_norm=t.max_grad_norm, weight_decay=t.weight_decay,
        optim="adamw_torch", logging_steps=10, save_strategy="no", report_to="none",
        use_cpu=True, remove_unused_columns=False, seed=cfg.seed, disable_tqdm=True,
        dataloader_num_workers=0)
    data = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.save_pretrained(out / "baseline_adapter")
    return {"seconds": seconds, "real_tokens": counts["real"], "allocator": active_allocator(),
            "padding_pct": 100 * (1 - counts["real"] / counts["padded"])}


def seeded_training(cfg, tok) -> dict:
    """fashionfuse's training of the bench's adapter (seed 0), as `fashionfuse train-adapter`;
    its metrics and the allocator it ran under."""
    from fashionfuse.allocator import active_allocator
    from fashionfuse.train.trainer import train_one_adapter

    torch.manual_seed(0)
    return {**train_one_adapter(cfg, "chat", tok), "allocator": active_allocator()}


def print_memory_cap(cfg, cap_gb: float, batch: str, suffix: str, envs: dict) -> None:
    """One micro-batch of `batch` (ROWSxTOKENS) on each side in its own process (environment
    `envs[side]`): uncapped (peak RSS) and under an address-space cap of `cap_gb`; prints
    whether each trained."""
    rows, width = (int(x) for x in batch.lower().split("x"))
    tag = f"{suffix}_{rows}x{width}"
    print(f"memory cap: {cap_gb:g} GB of address space (RLIMIT_AS), one micro-batch of {rows} x "
          f"{width} tokens, gradient checkpointing on both sides")
    peaks = {}
    for side in ("baseline", "fashionfuse"):
        result, error, peaks[side] = in_child(one_step, cfg, side, rows, width, env=envs[side])
        if error:
            raise SystemExit(f"{side} uncapped step failed: {error}")
        print(f"{side}: uncapped {result['seconds']:.1f} s, loss {result['loss']:.4f}, peak RSS "
              f"{peaks[side]:.0f} MiB", flush=True)
        result, error, _ = in_child(one_step, cfg, side, rows, width, cap_gb=cap_gb,
                                    env=envs[side])
        print(f"fits_under_cap_{side}{tag}: {'yes' if error is None else 'no'}"
              + (f" ({error})" if error else ""), flush=True)
    print(f"peak_rss_mib_baseline{tag}: {peaks['baseline']:.0f}")
    print(f"peak_rss_mib_fashionfuse{tag}: {peaks['fashionfuse']:.0f}")
    print(f"peak_rss_ratio{tag}: {peaks['fashionfuse'] / peaks['baseline']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--pack-length", type=int, default=None,
                        help="Tokens per packed row (default: --max-len)")
    parser.add_argument("--size", choices=["demo", "30m", "300m"], default="demo",
                        help="base model: the demo tiny Llama or a random-initialised Llama")
    parser.add_argument("--model", choices=["demo", "smollm2"], default="demo",
                        help="smollm2: the real SmolLM2-135M-Instruct on real data (see above)")
    parser.add_argument("--mix", choices=["lognormal", "padding30"], default="lognormal")
    parser.add_argument("--baseline-dtype", default="bfloat16",
                        choices=["bfloat16", "float16", "float32"],
                        help="Compute dtype of the plain setup (the QLoRA recipe: bfloat16)")
    parser.add_argument("--compute-dtype", default="auto",
                        choices=["auto", "bfloat16", "float16", "float32"],
                        help="fashionfuse's model.quantization.compute_dtype")
    parser.add_argument("--same-dtype-too", action="store_true",
                        help="Also train fashionfuse with the baseline's compute dtype (packing "
                        "alone), when auto resolved to another one")
    parser.add_argument("--same-malloc-too", action="store_true",
                        help="Also train the baseline under fashionfuse's allocator (tcmalloc "
                        "where installed, see allocator.py); it runs on the system's by default")
    parser.add_argument("--repeats", type=int, default=1,
                        help="train both sides this many times, alternating; the medians count "
                        "(this machine's speed drifts by tens of percent between minutes)")
    parser.add_argument("--held-out", type=int, default=120, metavar="CHATS",
                        help="held-out chats for the final loss of each adapter")
    parser.add_argument("--memory-cap", type=float, default=None, metavar="GB",
                        help="Then train one --cap-batch micro-batch on each side uncapped and "
                        "under this address-space cap (RLIMIT_AS), gradient checkpointing on")
    parser.add_argument("--cap-batch", default="8x1024", metavar="ROWSxTOKENS",
                        help="The micro-batch of --memory-cap (default 8x1024)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="After the measurement, profile this many fashionfuse steps")
    args = parser.parse_args()
    suffix = "" if (args.size, args.mix) == ("demo", "lognormal") else \
        "_" + (args.size if args.mix == "lognormal" else args.mix)
    template = "table9"
    if args.model == "smollm2":
        suffix, template, args.compute_dtype = "_smollm2", "model", args.baseline_dtype
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import yaml

    from fashionfuse.base_model import load_tokenizer
    from fashionfuse.config import load_config
    from fashionfuse.examples import tokenize_records
    from fashionfuse.train.trainer import train_one_adapter

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = tmp / "run"
        (run / "curate" / "chat").mkdir(parents=True)
        model_dir = MODEL
        if args.size != "demo":
            from bench_models import random_llama

            from fashionfuse.base_model import load_tokenizer as _tok
            from fashionfuse.config import ModelConfig

            vocab = len(_tok(ModelConfig(base=str(MODEL))))
            params = random_llama(tmp / "base", args.size, MODEL, vocab)
            model_dir = tmp / "base"
            print(f"base: random Llama, {params / 1e6:.1f}M parameters")
        if args.model == "smollm2":
            sys.path.insert(0, str(ROOT / "scripts"))
            from fetch_smollm2 import fetch_gguf

            model_dir = fetch_gguf()
            train_records = real_records(args.records)
            held_out_records = real_records(args.held_out, skip=args.records)
        else:
            train_records = synthetic_chats(args.records, seed=0, mix=args.mix)
            held_out_records = synthetic_chats(args.held_out, seed=1, mix=args.mix)
        with open(run / "curate" / "chat" / "train.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in train_records)
        config = {
            "run_dir": str(run), "seed": 0,
            "model": {"base": str(model_dir), "max_input_len": args.max_len,
                      "chat_template": template,
                      "quantization": {"compute_dtype": args.compute_dtype}},
            "datasets": [{"name": "chat", "kind": "chat",
                          "source": {"format": "sharegpt", "path": str(tmp / "unused.jsonl")}}],
            "training": {"batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
                         "epochs": args.epochs, "learning_rate": 2e-3, "optimizer": "adamw",
                         "pack_length": args.pack_length,
                         "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
                         "checkpoint_steps": 10 ** 6, "logging_steps": 10 ** 6},
        }
        (tmp / "config.yaml").write_text(yaml.safe_dump(config))
        cfg = load_config(tmp / "config.yaml")
        tok = load_tokenizer(cfg.model)
        examples = tokenize_records(train_records, tok, cfg.model.system_message, args.max_len,
                                    template)
        held_out = tokenize_records(held_out_records, tok, cfg.model.system_message, args.max_len,
                                    template)
        n_params = _parameter_count(cfg)
        peak = matmul_peak_flops()
        bf16_peak = matmul_peak_flops(torch.bfloat16)
        print(f"model: {n_params / 1e6:.1f}M parameters; matmul peak float32 "
              f"{peak / 1e9:.1f}, bfloat16 {bf16_peak / 1e9:.1f} GFLOP/s on "
              f"{torch.get_num_threads()} threads")
        steps = math.ceil(math.ceil(len(examples) / args.batch_size) * args.epochs)
        lengths = sorted(len(e["input_ids"]) for e in examples)
        from fashionfuse.base_model import resolve_compute_dtype

        print(f"compute dtype: baseline {args.baseline_dtype}, fashionfuse {args.compute_dtype} "
              f"-> {resolve_compute_dtype(cfg.model.quantization, 'cpu')} on this CPU")
        print(f"data: {len(examples)} chats, tokens min/median/max "
              f"{lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[-1]}, {steps} steps of "
              f"{args.batch_size} chats, micro-batch {args.micro_batch_size}")

        from fashionfuse.allocator import chosen_library, preload_environment

        library = chosen_library()  # what the `fashionfuse` command preloads (FASHIONFUSE_MALLOC)
        envs = {"baseline": None,
                "fashionfuse": preload_environment(library) if library else None}
        print(f"allocator: baseline the system's malloc, fashionfuse "
              f"{library or 'the system malloc (no tcmalloc found)'}")
        memory: dict[str, list[float]] = {"baseline": [], "fashionfuse": []}
        base_runs, our_runs = [], []
        for i in range(args.repeats):  # each run in its own process: its own peak RSS
            result, error, rss = in_child(run_baseline, cfg, examples, tmp / f"baseline_{i}",
                                          steps, args.baseline_dtype)
            if error:
                raise SystemExit(f"baseline run failed: {error}")
            base_runs.append(result)
            memory["baseline"].append(rss)
            print(f"baseline (HF Trainer + PEFT, padded): {base_runs[-1]['seconds']:.1f} s, "
                  f"{base_runs[-1]['real_tokens'] / base_runs[-1]['seconds']:.0f} tokens/s, "
                  f"padding {base_runs[-1]['padding_pct']:.1f} %", flush=True)
            run_i = run if i == 0 else sharing_data(run, tmp / f"run_{i}")
            result, error, rss = in_child(seeded_training, cfg.model_copy(
                update={"run_dir": str(run_i)}), tok, env=envs["fashionfuse"])
            if error:
                raise SystemExit(f"fashionfuse run failed: {error}")
            our_runs.append(result)
            memory["fashionfuse"].append(rss)
            print(f"fashionfuse (packed): {our_runs[-1]['train_seconds']:.1f} s, "
                  f"{our_runs[-1]['real_tokens'] / our_runs[-1]['train_seconds']:.0f} tokens/s, "
                  f"padding {our_runs[-1]['padding_pct']:.1f} %", flush=True)
        base, ours = base_runs[0], our_runs[0]
        base_tps = statistics.median(r["real_tokens"] / r["seconds"] for r in base_runs)
        ours_tps = statistics.median(r["real_tokens"] / r["train_seconds"] for r in our_runs)
        pair_ratios = [(o["real_tokens"] / o["train_seconds"]) / (b["real_tokens"] / b["seconds"])
                       for b, o in zip(base_runs, our_runs)]

        same_malloc = None
        if args.same_malloc_too and envs["fashionfuse"] is not None:
            same_malloc, error, rss = in_child(run_baseline, cfg, examples, tmp / "baseline_same",
                                               steps, args.baseline_dtype,
                                               env=envs["fashionfuse"])
            if error:
                raise SystemExit(f"baseline run under {library} failed: {error}")
            same_malloc["rss"] = rss
            print(f"baseline under {same_malloc['allocator']}: {same_malloc['seconds']:.1f} s, "
                  f"{same_malloc['real_tokens'] / same_malloc['seconds']:.0f} tokens/s, peak RSS "
                  f"{rss:.0f} MiB", flush=True)

        same_dtype_tps = None
        if args.same_dtype_too and ours.get("compute_dtype") != args.baseline_dtype:
            same = cfg.model_copy(update={"run_dir": str(sharing_data(run, tmp / "same_dtype")),
                                          "model": baseline_model_cfg(cfg, args.baseline_dtype)})
            torch.manual_seed(0)
            again = train_one_adapter(same, "chat", tok)
            same_dtype_tps = again["real_tokens"] / again["train_seconds"]
            print(f"fashionfuse (packed, {args.baseline_dtype}): {again['train_seconds']:.1f} s, "
                  f"{same_dtype_tps:.0f} tokens/s")
        elif args.same_dtype_too:  # `auto` resolved to the baseline's dtype on this CPU
            same_dtype_tps = ours_tps
            print(f"fashionfuse already ran in the baseline's {args.baseline_dtype}: the "
                  "same-dtype ratio is the ratio above")

        loss_base = held_out_loss(cfg.model, tmp / "baseline_0" / "baseline_adapter", held_out,
                                  tok.pad_token_id)
        loss_ours = held_out_loss(cfg.model, run / "adapters" / "chat", held_out, tok.pad_token_id)
        if args.profile:
            profile_run = sharing_data(run, tmp / "profile_run")
            print_profile(cfg.model_copy(update={"run_dir": str(profile_run)}), tok, args.profile)

    # the peaks again after the runs, the higher of the two kept: a peak measured while the
    # shared machine was slowed would inflate every MFU figure
    peak, bf16_peak = max(peak, matmul_peak_flops()), max(bf16_peak,
                                                         matmul_peak_flops(torch.bfloat16))
    print(f"matmul peak (the higher of before and after the runs): float32 {peak / 1e9:.1f}, "
          f"bfloat16 {bf16_peak / 1e9:.1f} GFLOP/s")
    print(f"tokens_per_s_baseline: {base_tps:.1f}")
    print(f"tokens_per_s_fashionfuse: {ours_tps:.1f}")
    print(f"padding_waste_pct_baseline: {base['padding_pct']:.2f}")
    if args.repeats > 1:
        print(f"tokens_per_s_ratio_per_pair: {', '.join(f'{r:.2f}' for r in pair_ratios)}")
    print(f"tokens_per_s_ratio{suffix}: {ours_tps / base_tps:.2f}")
    if same_dtype_tps is not None:
        print(f"tokens_per_s_ratio{suffix}_same_dtype: {same_dtype_tps / base_tps:.2f}")
    print(f"padding_waste_pct: {ours['padding_pct']:.2f}")
    print(f"final_loss_baseline: {loss_base:.4f}")
    print(f"final_loss_fashionfuse: {loss_ours:.4f}")
    print(f"mfu_pct_baseline{suffix}: {100 * 6 * n_params * base_tps / peak:.2f}")
    print(f"mfu_pct_fashionfuse{suffix}: {100 * 6 * n_params * ours_tps / peak:.2f}")
    print(f"mfu_pct_of_bf16_peak_baseline{suffix}: {100 * 6 * n_params * base_tps / bf16_peak:.2f}")
    print(f"mfu_pct_of_bf16_peak_fashionfuse{suffix}: "
          f"{100 * 6 * n_params * ours_tps / bf16_peak:.2f}")
    rss_base, rss_ours = (statistics.median(memory[k]) for k in ("baseline", "fashionfuse"))
    print(f"peak_rss_mib_baseline{suffix}: {rss_base:.0f}")
    print(f"peak_rss_mib_fashionfuse{suffix}: {rss_ours:.0f}")
    print(f"peak_rss_ratio{suffix}: {rss_ours / rss_base:.2f}")
    print(f"allocator_baseline: {base['allocator']}")
    print(f"allocator_fashionfuse: {ours['allocator']}")
    if same_malloc is not None:
        same_tps = same_malloc["real_tokens"] / same_malloc["seconds"]
        print(f"tokens_per_s_ratio{suffix}_same_malloc: {ours_tps / same_tps:.2f}")
        print(f"peak_rss_mib_baseline{suffix}_same_malloc: {same_malloc['rss']:.0f}")
        print(f"peak_rss_ratio{suffix}_same_malloc: {rss_ours / same_malloc['rss']:.2f}")
    elif args.same_malloc_too:
        print("same_malloc: fashionfuse runs on the system's malloc here: the ratios above")
    if args.memory_cap:
        print_memory_cap(cfg, args.memory_cap, args.cap_batch, suffix, envs)


if __name__ == "__main__":
    main()
