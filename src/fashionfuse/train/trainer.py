"""`train_adapters(cfg)`: one QLoRA adapter per curated dataset (plus the baselines of Table 8),
packed, resumable from checkpoints, single-process or DDP.

One adapter's training runs in phases: `resolve_job` (what to train: spec, fingerprint, paths,
tokenised examples, step counts), `setup` (model, optimiser, scheduler, restored checkpoint),
`fit` (the steps, each `train_step`), then `_save_adapter`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..allocator import active_allocator
from ..architectures import check_tokenizer_fits
from ..base_model import (
    base_fingerprint_parts,
    default_device,
    load_tokenizer,
    quantization_record,
    resolve_compute_dtype,
)
from ..adapters.model_card import portable_base, record_base, write_model_card
from ..chat_template import IGNORE_INDEX, install_chat_template, resolve_template
from ..config import AdapterSpec, RunConfig, config_hash
from ..console import progress_file
from ..devices import Precision, detect, training_precision
from ..errors import UserError
from ..examples import collate, load_records, tokenize_records
from ..head_loss import loss_path, token_losses
from .mixing import mix_examples
from ..adapters.saved import fuse_adapters, load_saved_adapter, save_peft_adapter
from ..plots import pyplot, save_figure
from ..rundir import (
    RunLayout,
    artifact_id,
    atomic_dir,
    fingerprint,
    is_up_to_date,
    read_manifest,
    without_unset,
    write_json,
    write_manifest,
)
from ..tracking import Tracker
from .batching import collate_packed, plan_micro_batches, step_windows
from .distributed import World, all_sum, barrier, gather, init_world, wrap
from .model import build_optimizer, build_trainable_model
from .validation import ValidationCurve, validation_curve

# called with the number of finished steps after each step is stored (tests stop a run with it)
Progress = Callable[[int], None]


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (non-finite loss, missing curated data)."""


def train_fingerprint(cfg: RunConfig, name: str) -> str:
    """Everything one adapter depends on: model, training section, seed, curated data, and the
    adapters it is trained on top of (their contents)."""
    layout = RunLayout(cfg.run_dir)
    spec = cfg.adapter_spec(name)
    return fingerprint({
        "stage": "train", "adapter": _spec_settings(spec),
        "model": cfg.model.model_dump(mode="json"), "base": base_fingerprint_parts(cfg.model),
        "training": _training_settings(cfg), "seed": cfg.seed,
        # what `auto` resolves to here: an adapter trained in float32 on a CPU is not current
        # for a bf16 GPU run of the same config
        "compute_dtype": resolve_compute_dtype(cfg.model.quantization, default_device()),
        "curated": {d: artifact_id(layout.curated(d)) for d in spec.datasets},
        "on_top_of": {n: artifact_id(layout.adapter(n)) for n in spec.on_top_of},
    })


def _spec_settings(spec: AdapterSpec) -> dict:
    """The adapter's spec as fingerprinted: an unset `mix` and `shared_a` (added later) left
    out, so adapters built before them keep their fingerprints."""
    settings = without_unset(spec.model_dump(mode="json"), ("mix",))
    if settings.get("shared_a") is None:
        settings.pop("shared_a", None)
    return settings


def _training_settings(cfg: RunConfig) -> dict:
    """The training section as fingerprinted: an unset `seed` (added later) left out, so
    adapters built before it keep their fingerprints; the validation curve's settings left out
    (they change no weight)."""
    settings = cfg.training.model_dump(mode="json", exclude={"eval_steps", "eval_samples"})
    for unset in ("seed", "autocast"):  # auto: resolved below (compute dtype) and in the manifest
        if settings.get(unset) is None:
            settings.pop(unset, None)
    return settings


# --------------------------------------------------------------------------- what to train
@dataclass
class TrainJob:
    """One adapter to train, resolved once from the config."""

    cfg: RunConfig
    name: str
    spec: AdapterSpec
    fingerprint: str
    out: Path  # the finished adapter directory
    work: Path  # checkpoint and running metrics while training
    examples: list[dict]
    lengths: list[int]  # tokens of each example (packing plans and token counts use them)
    splits: list[Path]
    steps_per_epoch: int
    total_steps: int
    mix: dict | None = None  # per dataset, what it contributed (adapters[].mix)


def resolve_job(cfg: RunConfig, name: str, tokenizer) -> TrainJob:
    """Read and tokenise the train splits of every dataset the adapter learns."""
    layout = RunLayout(cfg.run_dir)
    spec = cfg.adapter_spec(name)
    per_dataset, splits = {}, []
    for dataset in spec.datasets:
        split = layout.curated(dataset) / "train.jsonl"
        if not split.exists():
            raise TrainingError(f"{split}: curated data missing, run `fashionfuse curate` first")
        per_dataset[dataset] = tokenize_records(load_records(split), tokenizer,
                                                cfg.model.system_message, cfg.model.max_input_len,
                                                cfg.model.chat_template)
        splits.append(split)
    mix = None
    if spec.mix is not None:
        examples, mix = mix_examples(per_dataset, spec.mix, cfg.training_seed)
    else:
        examples = [e for dataset in spec.datasets for e in per_dataset[dataset]]
    if not examples:
        raise TrainingError(f"{', '.join(map(str, splits))}: no trainable examples")
    t = cfg.training
    per_epoch = math.ceil(len(examples) / t.batch_size)
    return TrainJob(cfg, name, spec, train_fingerprint(cfg, name), layout.adapter(name),
                    layout.train_work(name), examples, [len(e["input_ids"]) for e in examples],
                    splits, per_epoch,
                    t.max_steps or max(1, math.ceil(per_epoch * t.epochs)), mix)


# --------------------------------------------------------------------------- setup
@dataclass
class Session:
    """The trainable model and its optimiser state on this process."""

    world: World
    model: object  # the PeftModel (saved, checkpointed)
    ddp: object  # what the forward pass runs: the model, or DDP around it
    params: list
    optimizer: object
    optimizer_name: str
    scheduler: object
    pack_length: int | None
    targets: list[str]
    attention: str | None
    compute_dtype: str  # resolved for this process's device
    precision: Precision = Precision(None, False)  # autocast and loss scaling of the forward
    shared_a: str | None = None  # hash of the shared frozen A (training.lora.shared_a)
    scaler: object = None  # torch.amp.GradScaler with float16 autocast
    start: int = 0
    history: list[dict] = field(default_factory=list)
    curve: ValidationCurve | None = None  # the validation loss beside the training loss


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def setup(job: TrainJob, tokenizer, world: World) -> Session:
    """Build the QLoRA model (beside frozen earlier adapters for `on_top_of`), the optimiser and
    scheduler, and restore the last checkpoint of this job when there is one."""
    from transformers import get_scheduler

    cfg, t = job.cfg, job.cfg.training
    layout = RunLayout(cfg.run_dir)
    _seed_everything(cfg.training_seed + world.rank)
    if job.spec.shared_a is not None:  # this adapter's own choice (ablate's merge_ready)
        t = t.model_copy(update={"lora": t.lora.model_copy(
            update={"shared_a": job.spec.shared_a})})
    built = build_trainable_model(cfg.model, t, device=world.device,
                                  frozen_adapters=[layout.adapter(n) for n in job.spec.on_top_of],
                                  log=print if world.is_main else (lambda *_: None),
                                  seed=cfg.training_seed)
    check_tokenizer_fits(built.model, tokenizer)
    params = [p for p in built.model.parameters() if p.requires_grad]
    optimizer, optimizer_name = build_optimizer(params, t)
    scheduler = get_scheduler(t.lr_scheduler, optimizer,
                              num_warmup_steps=int(round(t.warmup_ratio * job.total_steps)),
                              num_training_steps=job.total_steps)
    pack_length = (t.pack_length or cfg.model.max_input_len) if built.attention else None
    compute_dtype = resolve_compute_dtype(cfg.model.quantization, world.device)
    precision = training_precision(compute_dtype, detect(world.device), t.autocast)
    session = Session(world, built.model, built.model, params, optimizer, optimizer_name,
                      scheduler, pack_length, built.targets, built.attention, compute_dtype,
                      precision, built.shared_a,
                      torch.amp.GradScaler(torch.device(world.device).type)
                      if precision.loss_scaling else None)
    job.work.mkdir(parents=True, exist_ok=True)
    session.start = _load_checkpoint(job, session)
    history_path = job.work / "metrics.jsonl"
    if session.start and history_path.exists():
        session.history = [h for h in map(json.loads, history_path.read_text().splitlines())
                           if h["step"] <= session.start]
    session.curve = validation_curve(cfg, job.spec.datasets, job.total_steps, tokenizer,
                                     world.device)
    session.ddp = wrap(world, built.model)
    session.ddp.train()
    return session


def _announce(job: TrainJob, s: Session, tokenizer) -> None:
    cfg = job.cfg
    template = resolve_template(tokenizer, cfg.model.chat_template)
    print(f"train {job.name}: chat template: "
          + ("the model's own" if template == "model" else "the paper's Table 9"))
    if template == "table9" and tokenizer.bos_token is None:
        print(f"train {job.name}: note: the tokenizer has no BOS token, so Table 9 prompts start "
              "without <s> (as such models expect); set model.chat_template: model to train in "
              "the model's own chat format")
    print(f"train {job.name}: LoRA r={cfg.training.lora.r} on {len(s.targets)} linear kinds "
          f"({', '.join(s.targets)}); packed attention: {s.attention or 'off'}; compute dtype: "
          f"{s.compute_dtype} ({s.precision.describe()}); allocator: {active_allocator()}")
    if s.start:
        print(f"train {job.name}: resuming from step {s.start}/{job.total_steps}")


# --------------------------------------------------------------------------- checkpoints
def _save_checkpoint(job: TrainJob, s: Session, step: int) -> None:
    """Adapter weights, optimiser, scheduler, step and every rank's RNG, written by rank 0."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    rng = gather(s.world, {"torch": torch.get_rng_state(), "python": random.getstate(),
                           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None})
    if s.world.is_main:
        with atomic_dir(job.work / "checkpoint") as tmp:
            save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(s.model).items()},
                      str(tmp / "adapter_model.safetensors"))
            torch.save({"optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
                        "scaler": s.scaler.state_dict() if s.scaler is not None else None,
                        "step": step, "rng": rng, "fingerprint": job.fingerprint}, tmp / "state.pt")
    barrier(s.world)


def _load_checkpoint(job: TrainJob, s: Session) -> int:
    """Restore adapter, optimiser, scheduler and RNG; return the finished step (0 if none)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state_path = job.work / "checkpoint" / "state.pt"
    if not state_path.exists():
        return 0
    # tensors and plain values only, onto the CPU: rank 0 saved its own CUDA tensors, which
    # would otherwise all land on cuda:0; the optimiser moves its state to its parameters' device
    state = torch.load(state_path, weights_only=True, map_location="cpu")
    if state.get("fingerprint") != job.fingerprint:
        return 0
    set_peft_model_state_dict(s.model, load_file(job.work / "checkpoint" / "adapter_model.safetensors"))
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    if s.scaler is not None and state.get("scaler"):
        s.scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) == s.world.size:  # a different process count cannot replay the RNG
        rng = state["rng"][s.world.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"])


# --------------------------------------------------------------------------- the steps
def _step_batches(job: TrainJob, s: Session, window: list[int], pad_id: int):
    """This process's share of one step's examples as micro-batches, and its weight (0 when a
    process has no example and runs one only to stay in sync)."""
    world, t = s.world, job.cfg.training
    mine, weight = window[world.rank::world.size], 1.0
    if not mine:
        mine, weight = window[:1], 0.0
    plan = plan_micro_batches(mine, job.lengths, t.micro_batch_size, s.pack_length)
    ex = job.examples
    batches = [collate_packed([[ex[i] for i in row] for row in mb], pad_id) if s.pack_length
               else collate([ex[row[0]] for row in mb], pad_id) for mb in plan]
    return mine, weight, batches


def train_step(job: TrainJob, s: Session, window: list[int], pad_id: int) -> dict:
    """One optimiser step over `window` (the step's examples, all processes); returns its
    record: loss (token-weighted mean over every process), trained tokens, padding."""
    world, t = s.world, job.cfg.training
    mine, weight, batches = _step_batches(job, s, window, pad_id)
    # counted on the CPU batches: no device read per micro-batch
    local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    (step_tokens,) = all_sum(world, [local_tokens * weight])
    loss_local = torch.zeros((), dtype=torch.float64, device=world.device)
    for k, b in enumerate(batches):
        b = {key: v.to(world.device, non_blocking=True) for key, v in b.items()}
        sync = world.size == 1 or k == len(batches) - 1
        with (contextlib.nullcontext() if sync else s.ddp.no_sync()):
            with _autocast(s):
                loss_sum, _ = token_losses(s.ddp, b)
            scaled = loss_sum * (weight * world.size / max(step_tokens, 1))
            (s.scaler.scale(scaled) if s.scaler is not None else scaled).backward()
        loss_local += loss_sum.detach() * weight
    real = sum(job.lengths[i] for i in mine) * weight
    padded = sum(b["input_ids"].numel() for b in batches) * weight
    loss_total, real, padded = all_sum(world, [float(loss_local), real, padded])  # one read
    loss = loss_total / max(step_tokens, 1)
    if not math.isfinite(loss):
        return {"loss": loss}
    if s.scaler is not None:  # float16: gradients unscaled before clipping; a step whose
        s.scaler.unscale_(s.optimizer)  # scaled gradients overflowed is skipped by the scaler
    torch.nn.utils.clip_grad_norm_(s.params, t.max_grad_norm)
    if s.scaler is not None:
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "trained_tokens": int(step_tokens), "real": real, "padded": padded}


def _autocast(s: Session):
    """The forward's autocast context (`devices.training_precision`), or none."""
    if s.precision.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(s.world.device).type,
                          dtype=getattr(torch, s.precision.autocast_dtype))


def fit(job: TrainJob, s: Session, pad_id: int, progress: Progress | None = None,
        tracker=None) -> dict:
    """Run the remaining steps, logging, checkpointing; returns the token and time totals."""
    t = job.cfg.training
    history_path = job.work / "metrics.jsonl"
    bar = tqdm(total=job.total_steps, initial=s.start, desc=f"train {job.name}", unit="step",
               file=progress_file(),
               leave=False, disable=not s.world.is_main)
    totals = {"real": 0.0, "padded": 0.0, "seconds": 0.0}
    windows: list[list[int]] = []
    step = s.start
    try:
        while step < job.total_steps:
            epoch, within = divmod(step, job.steps_per_epoch)
            if not windows or within == 0:
                windows = step_windows(len(job.examples), t.batch_size,
                                       job.cfg.training_seed + epoch)
            t0 = time.perf_counter()
            rec = train_step(job, s, windows[within], pad_id)
            if not math.isfinite(rec["loss"]):
                raise TrainingError(f"train {job.name}: loss is {rec['loss']} at step {step + 1}; "
                                    "stopping (lower training.learning_rate or check the data)")
            step += 1
            elapsed = time.perf_counter() - t0
            for k, v in (("real", rec["real"]), ("padded", rec["padded"]), ("seconds", elapsed)):
                totals[k] += v
            s.history.append({
                "step": step, "epoch": round(step / job.steps_per_epoch, 3),
                "loss": round(rec["loss"], 5), "lr": s.scheduler.get_last_lr()[0],
                "trained_tokens": rec["trained_tokens"],
                "tokens_per_s": round(rec["real"] / max(elapsed, 1e-9), 1),
                "padding_pct": round(100 * (1 - rec["real"] / max(rec["padded"], 1)), 2)})
            h = s.history[-1]
            if s.curve is not None and s.curve.due(step, job.total_steps):
                val = s.curve.losses(s.model)
                h["val_loss"] = val.pop("all")
                if len(val) > 1:
                    h["val_loss_by_dataset"] = val
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}",
                            **({"val": f"{h['val_loss']:.3f}"} if "val_loss" in h else {}))
            if tracker is not None:
                tracker.log(step, {"train/loss": h["loss"], "train/lr": h["lr"],
                                   "train/tokens_per_s": h["tokens_per_s"],
                                   "train/padding_pct": h["padding_pct"],
                                   **({"val/loss": h["val_loss"]} if "val_loss" in h else {})})
            if s.world.is_main and (step % t.logging_steps == 0 or step % t.checkpoint_steps == 0):
                history_path.write_text("".join(json.dumps(h) + "\n" for h in s.history))
            if step % t.checkpoint_steps == 0 and step < job.total_steps:
                _save_checkpoint(job, s, step)
            if progress is not None:
                progress(step)
    finally:
        bar.close()
    return totals


# --------------------------------------------------------------------------- the adapter
def _plot_loss(history: list[dict], path: Path, name: str) -> None:
    """Training loss per step, and the validation loss where it was measured."""
    fig, ax = pyplot().subplots(figsize=(5, 3))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train")
    val = [h for h in history if "val_loss" in h]
    if val:
        ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], marker="o",
                label="validation")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per token)")
    ax.set_title(name)
    save_figure(fig, path)


def _save_adapter(job: TrainJob, s: Session, tokenizer, metrics: dict) -> None:
    """Write the adapter dir atomically: PEFT weights, tokenizer with its chat template,
    metrics, loss plot, manifest. A sequential adapter is saved together with the adapters it
    was trained beside (one exact concatenated LoRA on the plain base)."""
    cfg, spec = job.cfg, job.spec
    layout = RunLayout(cfg.run_dir)
    with atomic_dir(job.out) as tmp:
        if spec.on_top_of:
            s.model.save_pretrained(tmp / "trained", selected_adapters=["default"])
            parts = [load_saved_adapter(layout.adapter(n)) for n in spec.on_top_of]
            parts.append(load_saved_adapter(tmp / "trained"))
            config, tensors = fuse_adapters(parts, [1.0] * len(parts))
            shutil.rmtree(tmp / "trained")
            save_peft_adapter(tmp, config, tensors)
        else:
            s.model.save_pretrained(tmp)
        own_template = tokenizer.chat_template
        if resolve_template(tokenizer, cfg.model.chat_template) == "table9":
            # saved with the adapter; else the tokenizer keeps its own template
            install_chat_template(tokenizer, cfg.model.system_message)
        tokenizer.save_pretrained(tmp)
        tokenizer.chat_template = own_template  # the shared tokenizer renders as before
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in s.history))
        _plot_loss(s.history, tmp / "loss.png", job.name)
        record_base(tmp, cfg.model)
        _model_card(job, tmp, metrics)
        write_manifest(tmp, stage="train", fingerprint=job.fingerprint,
                       config_hash=config_hash(cfg.model, cfg.training, spec),
                       inputs={str(p): artifact_id(p.parent) for p in job.splits},
                       seed=cfg.training_seed, metrics=metrics,
                       extra={"adapter": job.name, "datasets": spec.datasets,
                              "on_top_of": spec.on_top_of, "mix": job.mix,
                              "shared_a": s.shared_a,
                              "quantization": quantization_record(s.model)},
                       content=["adapter_model.safetensors", "adapter_config.json"])


def _model_card(job: TrainJob, tmp: Path, metrics: dict) -> None:
    cfg, spec = job.cfg, job.spec
    shares = ", ".join(f"{d} {m['share']:.0%}" for d, m in (job.mix or {}).items())
    how = f"a mix of {shares} of the supervised tokens" if job.mix else "their training splits"
    summary = [f"A QLoRA adapter (LoRA r={cfg.training.lora.r}, alpha "
               f"{cfg.training.lora.alpha}) trained on {', '.join(spec.datasets)} ({how})"
               + (f", beside the frozen adapters {', '.join(spec.on_top_of)} and saved as their "
                  "exact concatenation" if spec.on_top_of else "") + "."]
    table = {"base model": portable_base(cfg.model), "datasets": ", ".join(spec.datasets),
             **{k.replace("_", " "): v for k, v in metrics.items()
                if isinstance(v, (int, float, str)) and not isinstance(v, bool)}}
    write_model_card(tmp, job.out, title=f"fashionfuse adapter: {job.name}",
                     base=portable_base(cfg.model), summary=summary, table=table)


def train_one_adapter(cfg: RunConfig, name: str, tokenizer, progress: Progress | None = None
                      ) -> dict:
    """Train one adapter (single process or DDP); rank 0 writes it with metrics and a loss plot.

    An optimiser step consumes `training.batch_size` examples in total, split over the
    processes; each process packs its share into rows and runs them in micro-batches, and the
    loss is the mean over every trained token of the step (exactly as one process would).
    """
    world = init_world()
    job = resolve_job(cfg, name, tokenizer)
    s = setup(job, tokenizer, world)
    tracker = Tracker(cfg, "train", name, resume_step=s.start) if world.is_main else None
    if world.is_main:
        _announce(job, s, tokenizer)
    try:
        totals = fit(job, s, tokenizer.pad_token_id, progress, tracker)
    finally:
        if tracker is not None:
            tracker.close()
    h = s.history
    metrics = {"steps": job.total_steps, "examples": len(job.examples),
               "final_loss": h[-1]["loss"], "first_loss": h[0]["loss"],
               "val_loss": next((r["val_loss"] for r in reversed(h) if "val_loss" in r), None),
               "optimizer": s.optimizer_name, "processes": world.size,
               "packing": bool(s.pack_length), "attention": s.attention,
               "compute_dtype": s.compute_dtype, "precision": s.precision.describe(),
               "loss": loss_path(s.ddp),
               "target_modules": s.targets, "train_seconds": round(totals["seconds"], 2),
               "real_tokens": int(totals["real"]),
               # what the loss trained on (assistant tokens), every step, resumed ones included
               "trained_tokens": sum(step["trained_tokens"] for step in h),
               "padding_pct": round(100 * (1 - totals["real"] / max(totals["padded"], 1)), 2)
               if totals["padded"] else None}
    try:
        if world.is_main:
            _save_adapter(job, s, tokenizer, metrics)
            shutil.rmtree(job.work, ignore_errors=True)
            print(f"train {name}: {job.total_steps} steps on {world.size} process(es), "
                  f"loss {metrics['first_loss']} -> {metrics['final_loss']}"
                  + (f" ({metrics['loss']})" if metrics["loss"] else ""))
        barrier(world)
    finally:
        release_session(s)
    return metrics


def release_session(s: Session) -> None:
    """Free one adapter's model and optimiser state before the next adapter of the process:
    bitsandbytes keeps every paged optimiser buffer in a process-wide list
    (`GlobalPageManager.paged_tensors`) for the life of the process, and a 4-bit model holds a
    reference cycle, freed only by the cycle collector; then the CUDA cache is emptied."""
    import gc

    release_paged_state(s.optimizer)
    s.optimizer.state.clear()
    s.model = s.ddp = s.optimizer = s.scheduler = s.scaler = s.curve = None
    s.params = []
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release_paged_state(optimizer) -> int:
    """Drop `optimizer`'s state tensors from bitsandbytes' global list of paged tensors (where
    they stay after the optimiser is gone); returns how many were dropped."""
    import sys

    functional = sys.modules.get("bitsandbytes.functional")
    if functional is None:  # bitsandbytes never loaded: nothing was paged
        return 0
    manager = functional.GlobalPageManager.get_instance()
    mine = {id(v) for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)}
    before = len(manager.paged_tensors)
    manager.paged_tensors[:] = [t for t in manager.paged_tensors if id(t) not in mine]
    return before - len(manager.paged_tensors)


def train_adapters(cfg: RunConfig, names: list[str] | None = None, force: bool = False
                   ) -> dict[str, dict]:
    """Train (or skip when up to date) each named adapter (default: every adapter); their
    metrics are added to `adapters/summary.json` beside the rows of adapters trained before."""
    layout = RunLayout(cfg.run_dir)
    tokenizer = load_tokenizer(cfg.model)
    results = {}
    for name in names or cfg.adapter_names:
        cfg.adapter_spec(name)  # KeyError for unknown names
        if not force and is_up_to_date(layout.adapter(name), train_fingerprint(cfg, name)):
            print(f"train {name}: up to date")
            results[name] = read_manifest(layout.adapter(name))["metrics"]
            continue
        results[name] = train_one_adapter(cfg, name, tokenizer)
    if init_world().is_main:  # every adapter trained so far keeps its row
        summary = layout.root / "adapters" / "summary.json"
        earlier = json.loads(summary.read_text()) if summary.exists() else {}
        write_json(summary, {**earlier, **results})
    return results
