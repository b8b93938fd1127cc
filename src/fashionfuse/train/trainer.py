"""`train_adapters(cfg)`: one QLoRA adapter per curated dataset, resumable from checkpoints."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..base_model import base_fingerprint_parts, load_tokenizer
from ..chat_template import install_chat_template
from ..config import RunConfig, config_hash
from ..rundir import (RunLayout, atomic_dir, fingerprint, read_manifest, write_json,
                      write_manifest)
from .batching import collate, length_grouped_batches, load_records, token_losses, tokenize_records
from .model import build_optimizer, build_trainable_model


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, missing curated data)."""


def train_fingerprint(cfg: RunConfig, dataset: str) -> str:
    """Everything one adapter depends on: model, training section, seed, curated data."""
    curated = read_manifest(RunLayout(cfg.run_dir).curated(dataset)) or {}
    return fingerprint({
        "stage": "train", "dataset": dataset, "model": cfg.model.model_dump(mode="json"),
        "base": base_fingerprint_parts(cfg.model), "training": cfg.training.model_dump(mode="json"),
        "seed": cfg.seed, "curated": curated.get("fingerprint"),
    })


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _schedule(cfg: RunConfig, n_examples: int) -> tuple[int, int, int]:
    """(accumulation steps, optimiser steps per epoch, total optimiser steps)."""
    t = cfg.training
    accum = max(1, t.batch_size // t.micro_batch_size)
    per_epoch = max(1, math.ceil(n_examples / (accum * t.micro_batch_size)))
    total = t.max_steps or max(1, math.ceil(per_epoch * t.epochs))
    return accum, per_epoch, total


def _save_checkpoint(work: Path, model, optimizer, scheduler, step: int, fp: str) -> None:
    ckpt = work / "checkpoint"
    with atomic_dir(ckpt) as tmp:
        model.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "step": step, "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate(), "fingerprint": fp}, tmp / "state.pt")


def _load_checkpoint(work: Path, model, optimizer, scheduler, fp: str) -> int:
    """Restore adapter, optimiser, scheduler and RNG; return the finished step (0 if none)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state_path = work / "checkpoint" / "state.pt"
    if not state_path.exists():
        return 0
    state = torch.load(state_path, weights_only=False)
    if state.get("fingerprint") != fp:
        return 0
    set_peft_model_state_dict(model, load_file(work / "checkpoint" / "adapter_model.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return int(state["step"])


def _plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (per token)")
    ax.set_title(path.parent.name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_one_adapter(cfg: RunConfig, dataset: str, tokenizer, stop_after: int | None = None
                      ) -> dict:
    """Train the adapter of one dataset; write it atomically with metrics and a loss plot."""
    from transformers import get_scheduler

    layout = RunLayout(cfg.run_dir)
    t = cfg.training
    split = layout.curated(dataset) / "train.jsonl"
    if not split.exists():
        raise TrainingError(f"{split}: curated data missing, run `fashionfuse curate` first")
    fp = train_fingerprint(cfg, dataset)
    examples = tokenize_records(load_records(split), tokenizer, cfg.model.system_message,
                                cfg.model.max_input_len)
    if not examples:
        raise TrainingError(f"{split}: no trainable examples")
    accum, per_epoch, total = _schedule(cfg, len(examples))
    _seed_everything(cfg.seed)
    model = build_trainable_model(cfg.model, t)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, optimizer_name = build_optimizer(params, t)
    scheduler = get_scheduler(t.lr_scheduler, optimizer,
                              num_warmup_steps=int(round(t.warmup_ratio * total)),
                              num_training_steps=total)
    work = layout.train_work(dataset)
    work.mkdir(parents=True, exist_ok=True)
    start = _load_checkpoint(work, model, optimizer, scheduler, fp)
    history_path = work / "metrics.jsonl"
    history = [json.loads(x) for x in history_path.read_text().splitlines()] if start else []
    history = [h for h in history if h["step"] <= start]
    if start:
        print(f"train {dataset}: resuming from step {start}/{total}")
    lengths = [len(e["input_ids"]) for e in examples]
    device = next(p.device for p in params)
    model.train()
    bar = tqdm(total=total, initial=start, desc=f"train {dataset}", unit="step", leave=False)
    step = start
    micro_batches: list[list[int]] = []
    t0 = time.perf_counter()
    while step < total:
        epoch, within = divmod(step, per_epoch)
        if not micro_batches or within == 0:
            micro_batches = length_grouped_batches(lengths, t.micro_batch_size, cfg.seed + epoch)
        group = micro_batches[within * accum:(within + 1) * accum] or micro_batches[:accum]
        batches = [collate([examples[i] for i in mb], tokenizer.pad_token_id) for mb in group]
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        loss_total = 0.0
        seen_tokens = 0
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            loss_sum, _ = token_losses(model, b)
            (loss_sum / max(n_tokens, 1)).backward()
            loss_total += loss_sum.item()
            seen_tokens += int(b["attention_mask"].sum())
        loss = loss_total / max(n_tokens, 1)
        if not math.isfinite(loss):
            raise TrainingError(f"train {dataset}: loss is {loss} at step {step + 1}; stopping")
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - t0
        t0 = time.perf_counter()
        history.append({"step": step, "epoch": round(step / per_epoch, 3), "loss": round(loss, 5),
                        "lr": scheduler.get_last_lr()[0], "trained_tokens": n_tokens,
                        "tokens_per_s": round(seen_tokens / max(elapsed, 1e-9), 1)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step % t.logging_steps == 0 or step == total:
            with open(history_path, "w") as fh:
                fh.write("".join(json.dumps(h) + "\n" for h in history))
        if step % t.checkpoint_steps == 0 and step < total:
            with open(history_path, "w") as fh:
                fh.write("".join(json.dumps(h) + "\n" for h in history))
            _save_checkpoint(work, model, optimizer, scheduler, step, fp)
        if stop_after is not None and step >= stop_after:
            bar.close()
            _save_checkpoint(work, model, optimizer, scheduler, step, fp)
            raise KeyboardInterrupt(f"stopped after step {step} (test hook)")
    bar.close()
    metrics = {"steps": total, "examples": len(examples), "final_loss": history[-1]["loss"],
               "first_loss": history[0]["loss"] if history else None, "optimizer": optimizer_name,
               "accumulation": accum}
    out = layout.adapter(dataset)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok = tokenizer
        install_chat_template(tok, cfg.model.system_message)
        tok.save_pretrained(tmp)
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        _plot_loss(history, tmp / "loss.png")
        write_manifest(tmp, stage="train", fingerprint=fp,
                       config_hash=config_hash(cfg.model, cfg.training),
                       inputs={str(split): (read_manifest(layout.curated(dataset)) or {}).get(
                           "fingerprint", "")},
                       seed=cfg.seed, metrics=metrics, extra={"dataset": dataset})
    shutil.rmtree(work, ignore_errors=True)
    print(f"train {dataset}: {total} steps, loss {metrics['first_loss']} -> {metrics['final_loss']}")
    return metrics


def train_adapters(cfg: RunConfig, datasets: list[str] | None = None, force: bool = False
                   ) -> dict[str, dict]:
    """Train (or skip when up to date) the adapter of each dataset."""
    layout = RunLayout(cfg.run_dir)
    names = datasets or [d.name for d in cfg.datasets]
    tokenizer = load_tokenizer(cfg.model)
    results = {}
    for name in names:
        cfg.dataset(name)  # KeyError for unknown names
        manifest = read_manifest(layout.adapter(name))
        if not force and manifest and manifest.get("fingerprint") == train_fingerprint(cfg, name):
            print(f"train {name}: up to date")
            results[name] = manifest["metrics"]
            continue
        results[name] = train_one_adapter(cfg, name, tokenizer)
    write_json(layout.root / "adapters" / "summary.json", results)
    return results
