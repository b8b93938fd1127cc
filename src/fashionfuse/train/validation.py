"""Validation loss while an adapter trains: the curve beside the training loss.

The adapter's datasets' curated validation splits (the records the search scores, never trained
on) are tokenised and batched once; every `training.eval_steps` optimiser steps, and after the
last, the model runs them without gradients in eval mode (no LoRA dropout). No random numbers
are drawn, so the trained weights are the same with or without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig
from ..examples import collate, load_records, tokenize_records
from ..head_loss import summed_loss
from ..rundir import RunLayout

BATCH_ROWS = 8  # validation rows per forward pass (sorted by length, so little padding)


@dataclass
class ValidationCurve:
    """The validation batches of one adapter's datasets, and when to score them."""

    batches: dict[str, list[dict[str, torch.Tensor]]]  # dataset -> padded batches
    every: int  # optimiser steps between points (the last step always has one)

    def due(self, step: int, total_steps: int) -> bool:
        """Whether `step` (1-based, finished) gets a validation point."""
        return step == total_steps or step % self.every == 0

    @torch.no_grad()
    def losses(self, model) -> dict[str, float]:
        """Token-weighted loss per dataset and over all of them (`all`), the model left in the
        mode it was in."""
        was_training = model.training
        model.eval()
        try:
            sums = {name: summed_loss(model, batches) for name, batches in self.batches.items()}
        finally:
            model.train(was_training)
        out = {n: round(t / max(k, 1), 5) for n, (t, k) in sums.items()}
        out["all"] = round(sum(t for t, _ in sums.values())
                           / max(sum(k for _, k in sums.values()), 1), 5)
        return out


def validation_curve(cfg: RunConfig, datasets: list[str], total_steps: int, tokenizer,
                     device: str) -> ValidationCurve | None:
    """The validation curve of an adapter trained on `datasets`; None when switched off
    (`training.eval_steps: 0`) or when none of them has a validation split with a trained
    token."""
    t = cfg.training
    if t.eval_steps == 0:
        return None
    layout = RunLayout(cfg.run_dir)
    batches = {}
    for name in datasets:
        path: Path = layout.curated(name) / "validation.jsonl"
        if not path.exists():
            continue
        ex = tokenize_records(load_records(path, t.eval_samples), tokenizer,
                              cfg.model.system_message, cfg.model.max_input_len,
                              cfg.model.chat_template)
        ex.sort(key=lambda e: len(e["input_ids"]))
        if ex:
            batches[name] = [{k: v.to(device) for k, v in
                              collate(ex[i:i + BATCH_ROWS], tokenizer.pad_token_id).items()}
                             for i in range(0, len(ex), BATCH_ROWS)]
    if not batches:
        return None
    every = t.eval_steps or max(1, -(-total_steps // 5))  # default: about five points
    return ValidationCurve(batches, every)
