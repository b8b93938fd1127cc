"""`train_adapters(cfg)`: one QLoRA adapter per curated dataset (plus the baselines of Table 8),
packed, resumable from checkpoints, single-process or DDP."""

from __future__ import annotations

import contextlib
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
from ..rundir import (RunLayout, artifact_id, atomic_dir, fingerprint, is_up_to_date, read_manifest, write_json,
                      write_manifest)
from ..chat_template import IGNORE_INDEX
from ..lora import fuse_adapters, load_saved_adapter, save_peft_adapter
from .batching import (collate, collate_packed, load_records, plan_micro_batches, step_windows,
                       token_losses, tokenize_records)
from .distributed import World, all_sum, barrier, gather, init_world, wrap
from ..architectures import check_tokenizer_fits
from .model import build_optimizer, build_trainable_model


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, missing curated data)."""


def train_fingerprint(cfg: RunConfig, name: str) -> str:
    """Everything one adapter depends on: model, training section, seed, curated data, and the
    adapters it is trained on top of."""
    layout = RunLayout(cfg.run_dir)
    spec = cfg.adapter_spec(name)
    return fingerprint({
        "stage": "train", "adapter": spec.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"), "base": base_fingerprint_parts(cfg.model),
        "training": cfg.training.model_dump(mode="json"), "seed": cfg.seed,
        "curated": {d: artifact_id(layout.curated(d)) for d in spec.datasets},
        "on_top_of": {n: artifact_id(layout.adapter(n)) for n in spec.on_top_of},
    })


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _save_checkpoint(work: Path, world: World, model, optimizer, scheduler, step: int,
                     fp: str) -> None:
    """Adapter weights, optimiser, scheduler, step and every rank's RNG, written by rank 0."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    rng = gather(world, {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None})
    if world.is_main:
        with atomic_dir(work / "checkpoint") as tmp:
            save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()},
                      str(tmp / "adapter_model.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "step": step, "rng": rng, "fingerprint": fp}, tmp / "state.pt")
    barrier(world)


def _load_checkpoint(work: Path, world: World, model, optimizer, scheduler, fp: str) -> int:
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
    if len(state["rng"]) == world.size:  # a different process count cannot replay the RNG
        rng = state["rng"][world.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
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


def _training_examples(cfg: RunConfig, name: str, tokenizer) -> tuple[list[dict], list[Path]]:
    """Tokenised train splits of every dataset the adapter learns (concatenated)."""
    layout = RunLayout(cfg.run_dir)
    examples, splits = [], []
    for dataset in cfg.adapter_spec(name).datasets:
        split = layout.curated(dataset) / "train.jsonl"
        if not split.exists():
            raise TrainingError(f"{split}: curated data missing, run `fashionfuse curate` first")
        examples += tokenize_records(load_records(split), tokenizer, cfg.model.system_message,
                                     cfg.model.max_input_len, cfg.model.chat_template)
        splits.append(split)
    if not examples:
        raise TrainingError(f"{', '.join(map(str, splits))}: no trainable examples")
    return examples, splits


def _save_adapter(cfg: RunConfig, name: str, model, tokenizer, out: Path, history: list[dict],
                  fp: str, splits: list[Path], metrics: dict) -> None:
    """Write the adapter dir atomically: PEFT weights, tokenizer with the Table 9 template,
    metrics, loss plot, manifest. A sequential adapter is saved together with the adapters it
    was trained on top of (one exact concatenated LoRA on the plain base)."""
    layout = RunLayout(cfg.run_dir)
    spec = cfg.adapter_spec(name)
    with atomic_dir(out) as tmp:
        if spec.on_top_of:
            model.save_pretrained(tmp / "trained", selected_adapters=["default"])
            parts = [load_saved_adapter(layout.adapter(n)) for n in spec.on_top_of]
            parts.append(load_saved_adapter(tmp / "trained"))
            config, tensors = fuse_adapters(parts, [1.0] * len(parts))
            shutil.rmtree(tmp / "trained")
            save_peft_adapter(tmp, config, tensors)
        else:
            model.save_pretrained(tmp)
        if cfg.model.chat_template == "table9":  # else the tokenizer keeps its own template
            install_chat_template(tokenizer, cfg.model.system_message)
        tokenizer.save_pretrained(tmp)
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        _plot_loss(history, tmp / "loss.png")
        write_manifest(tmp, stage="train", fingerprint=fp,
                       config_hash=config_hash(cfg.model, cfg.training, spec),
                       inputs={str(p): artifact_id(p.parent) for p in splits},
                       seed=cfg.seed, metrics=metrics,
                       extra={"adapter": name, "datasets": spec.datasets,
                              "on_top_of": spec.on_top_of},
                       content=["adapter_model.safetensors", "adapter_config.json"])


def train_one_adapter(cfg: RunConfig, name: str, tokenizer, stop_after: int | None = None
                      ) -> dict:
    """Train one adapter (single process or DDP); rank 0 writes it with metrics and a loss plot.

    An optimiser step consumes `training.batch_size` examples in total, split over the
    processes; each process packs its share into rows and runs them in micro-batches, and the
    loss is the mean over every trained token of the step (exactly as one process would).
    """
    from transformers import get_scheduler

    world = init_world()
    layout = RunLayout(cfg.run_dir)
    t = cfg.training
    spec = cfg.adapter_spec(name)
    fp = train_fingerprint(cfg, name)
    examples, splits = _training_examples(cfg, name, tokenizer)
    lengths = [len(e["input_ids"]) for e in examples]
    per_epoch = math.ceil(len(examples) / t.batch_size)
    total = t.max_steps or max(1, math.ceil(per_epoch * t.epochs))
    _seed_everything(cfg.seed + world.rank)
    built = build_trainable_model(cfg.model, t, device=world.device,
                                  frozen_adapters=[layout.adapter(n) for n in spec.on_top_of],
                                  log=print if world.is_main else (lambda *_: None))
    model = built.model
    check_tokenizer_fits(model, tokenizer)
    pack_length = (t.pack_length or cfg.model.max_input_len) if built.attention else None
    if world.is_main and cfg.model.chat_template == "table9" and tokenizer.bos_token is None:
        print(f"train {name}: note: the tokenizer has no BOS token, so Table 9 prompts start "
              "without <s> (as such models expect); set model.chat_template: model to train in "
              "the model's own chat format")
    if world.is_main:
        print(f"train {name}: LoRA r={t.lora.r} on {len(built.targets)} linear kinds "
              f"({', '.join(built.targets)}); packed attention: {built.attention or 'off'}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, optimizer_name = build_optimizer(params, t)
    scheduler = get_scheduler(t.lr_scheduler, optimizer,
                              num_warmup_steps=int(round(t.warmup_ratio * total)),
                              num_training_steps=total)
    work = layout.train_work(name)
    work.mkdir(parents=True, exist_ok=True)
    start = _load_checkpoint(work, world, model, optimizer, scheduler, fp)
    history_path = work / "metrics.jsonl"
    history = ([json.loads(x) for x in history_path.read_text().splitlines()]
               if start and history_path.exists() else [])
    history = [h for h in history if h["step"] <= start]
    if start and world.is_main:
        print(f"train {name}: resuming from step {start}/{total}")
    ddp = wrap(world, model)
    ddp.train()
    bar = tqdm(total=total, initial=start, desc=f"train {name}", unit="step", leave=False,
               disable=not world.is_main)
    step = start
    windows: list[list[int]] = []
    padded_total = real_total = 0
    train_seconds = 0.0
    t0 = time.perf_counter()
    while step < total:
        epoch, within = divmod(step, per_epoch)
        if not windows or within == 0:
            windows = step_windows(len(examples), t.batch_size, cfg.seed + epoch)
        window = windows[within]
        mine, weight = window[world.rank::world.size], 1.0
        if not mine:  # fewer examples than processes: run one with zero weight to stay in sync
            mine, weight = window[:1], 0.0
        plan = plan_micro_batches(mine, lengths, t.micro_batch_size, pack_length)
        batches = [collate_packed([[examples[i] for i in row] for row in mb], tokenizer.pad_token_id)
                   if pack_length else collate([examples[row[0]] for row in mb],
                                               tokenizer.pad_token_id) for mb in plan]
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        (step_tokens,) = all_sum(world, [local_tokens * weight])
        loss_local = 0.0
        for k, b in enumerate(batches):
            b = {key: v.to(world.device) for key, v in b.items()}
            sync = world.size == 1 or k == len(batches) - 1
            with (contextlib.nullcontext() if sync else ddp.no_sync()):
                loss_sum, _ = token_losses(ddp, b)
                (loss_sum * (weight * world.size / max(step_tokens, 1))).backward()
            loss_local += loss_sum.item() * weight
        real = sum(lengths[i] for i in mine) * weight
        padded = sum(b["input_ids"].numel() for b in batches) * weight
        loss_total, real, padded = all_sum(world, [loss_local, real, padded])
        loss = loss_total / max(step_tokens, 1)
        if not math.isfinite(loss):
            bar.close()
            raise TrainingError(f"train {name}: loss is {loss} at step {step + 1}; stopping "
                                "(lower training.learning_rate or check the data)")
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - t0
        t0 = time.perf_counter()
        real_total += real
        padded_total += padded
        train_seconds += elapsed
        history.append({"step": step, "epoch": round(step / per_epoch, 3), "loss": round(loss, 5),
                        "lr": scheduler.get_last_lr()[0], "trained_tokens": int(step_tokens),
                        "tokens_per_s": round(real / max(elapsed, 1e-9), 1),
                        "padding_pct": round(100 * (1 - real / max(padded, 1)), 2)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if world.is_main and (step % t.logging_steps == 0 or step % t.checkpoint_steps == 0):
            with open(history_path, "w") as fh:
                fh.write("".join(json.dumps(h) + "\n" for h in history))
        if step % t.checkpoint_steps == 0 and step < total:
            _save_checkpoint(work, world, model, optimizer, scheduler, step, fp)
        if stop_after is not None and step >= stop_after:
            bar.close()
            if world.is_main:
                history_path.write_text("".join(json.dumps(h) + "\n" for h in history))
            _save_checkpoint(work, world, model, optimizer, scheduler, step, fp)
            raise KeyboardInterrupt(f"stopped after step {step} (test hook)")
    bar.close()
    metrics = {"steps": total, "examples": len(examples), "final_loss": history[-1]["loss"],
               "first_loss": history[0]["loss"], "optimizer": optimizer_name,
               "processes": world.size, "packing": bool(pack_length),
               "attention": built.attention, "target_modules": built.targets,
               "train_seconds": round(train_seconds, 2), "real_tokens": int(real_total),
               "padding_pct": round(100 * (1 - real_total / max(padded_total, 1)), 2)
               if padded_total else None}
    if world.is_main:
        _save_adapter(cfg, name, model, tokenizer, layout.adapter(name), history, fp, splits,
                      metrics)
        shutil.rmtree(work, ignore_errors=True)
        print(f"train {name}: {total} steps on {world.size} process(es), "
              f"loss {metrics['first_loss']} -> {metrics['final_loss']}")
    barrier(world)
    return metrics


def train_adapters(cfg: RunConfig, datasets: list[str] | None = None, force: bool = False
                   ) -> dict[str, dict]:
    """Train (or skip when up to date) the adapter of each dataset."""
    layout = RunLayout(cfg.run_dir)
    names = datasets or cfg.adapter_names
    tokenizer = load_tokenizer(cfg.model)
    results = {}
    for name in names:
        cfg.adapter_spec(name)  # KeyError for unknown names
        if not force and is_up_to_date(layout.adapter(name), train_fingerprint(cfg, name)):
            print(f"train {name}: up to date")
            results[name] = read_manifest(layout.adapter(name))["metrics"]
            continue
        results[name] = train_one_adapter(cfg, name, tokenizer)
    if init_world().is_main:
        write_json(layout.root / "adapters" / "summary.json", results)
    return results
