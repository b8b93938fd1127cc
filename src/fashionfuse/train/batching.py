"""Tokenise curated records and batch them by length (little padding, no attention leakage)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..chat_template import IGNORE_INDEX, tokenize_with_labels


def load_records(path: Path, limit: int | None = None) -> list[dict]:
    """Curated records from a JSONL split."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line))
                if limit is not None and len(out) >= limit:
                    break
    return out


def tokenize_records(records: list[dict], tokenizer, system: str, max_len: int) -> list[dict]:
    """Token ids + assistant-only labels for each record; records with nothing to learn dropped."""
    out = []
    for rec in records:
        ex = tokenize_with_labels(tokenizer, rec["messages"], rec.get("system") or system, max_len)
        if any(x != IGNORE_INDEX for x in ex["labels"][1:]):
            out.append(ex)
    return out


def length_grouped_batches(lengths: list[int], micro_batch: int, seed: int,
                           group_factor: int = 16) -> list[list[int]]:
    """Shuffle, then sort within windows of `micro_batch * group_factor` so batches share lengths."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = micro_batch * group_factor
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches += [chunk[i:i + micro_batch] for i in range(0, len(chunk), micro_batch)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over trained tokens, and how many tokens were trained."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:]
    loss_sum = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())
