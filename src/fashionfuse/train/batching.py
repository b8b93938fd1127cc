"""Tokenise curated records; plan steps, pack rows and collate (little padding, no attention
across packed examples)."""

from __future__ import annotations

import bisect
import json
import math
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


def tokenize_records(records: list[dict], tokenizer, system: str, max_len: int,
                     template: str = "table9") -> list[dict]:
    """Token ids + assistant-only labels for each record (Table 9 template, or the tokenizer's
    own with `template="model"`); records with nothing to learn dropped."""
    out = []
    for rec in records:
        ex = tokenize_with_labels(tokenizer, rec["messages"], rec.get("system") or system, max_len,
                                  template)
        if any(x != IGNORE_INDEX for x in ex["labels"][1:]):
            out.append(ex)
    return out


def step_windows(n_examples: int, batch_size: int, seed: int) -> list[list[int]]:
    """One epoch: a seeded shuffle cut into optimiser steps of `batch_size` examples."""
    order = list(range(n_examples))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n_examples, batch_size)]


def pack_rows(indices: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of examples into rows of at most `capacity` tokens."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row id), sorted
    for i in sorted(indices, key=lambda j: (-lengths[j], j)):
        pos = bisect.bisect_left(free, (lengths[i], -1))
        if pos < len(free):
            left, row = free.pop(pos)
            rows[row].append(i)
        else:
            left, row = capacity, len(rows)
            rows.append([i])
        bisect.insort(free, (left - lengths[i], row))
    return rows


def pack_balanced(indices: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """As few rows as `pack_rows` needs, but filled evenly (rows of equal length pad nothing
    when batched): pack against the smallest row length that still needs no extra row."""
    rows = pack_rows(indices, lengths, capacity)
    total = sum(lengths[i] for i in indices)
    target = max(max((lengths[i] for i in indices), default=1), math.ceil(total / len(rows)))
    while target < capacity:
        even = pack_rows(indices, lengths, target)
        if len(even) <= len(rows):
            return even
        target = min(capacity, target + max(1, target // 64))
    return rows


def plan_micro_batches(indices: list[int], lengths: list[int], micro_batch_size: int,
                       pack_length: int | None) -> list[list[list[int]]]:
    """Micro-batches of rows for one step's examples.

    Packing: each micro-batch is one row of at most `micro_batch_size * pack_length` tokens
    (the memory of `micro_batch_size` full rows) holding whole examples, with no padding at all
    (attention stays within each example, see varlen_attention). Without packing: rows of one
    example, sorted by length before chunking, so each micro-batch pads very little.
    """
    if pack_length:
        return [[row] for row in pack_balanced(indices, lengths, micro_batch_size * pack_length)]
    rows = [[i] for i in sorted(indices, key=lambda i: (-lengths[i], i))]
    return [rows[k:k + micro_batch_size] for k in range(0, len(rows), micro_batch_size)]


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


def collate_packed(rows: list[list[dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples, restarting position ids at 0 for every example.

    No attention mask is passed: the training model attends per example (varlen_attention), and
    plain transformers attention derives a block-diagonal causal mask from the position resets,
    so no token attends across examples either way. Each example's first label is masked so no
    loss crosses a boundary; a padding tail (rows of unequal length) is its own block with
    masked labels.
    """
    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            ids[r, at:at + n] = torch.tensor(e["input_ids"])
            labels[r, at + 1:at + n] = torch.tensor(e["labels"][1:])
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over trained tokens, and how many tokens were trained.

    `use_cache=False` matters for packed rows: transformers only derives the per-example
    attention blocks from position ids when no KV cache is passed. For a single packed row the
    vocabulary projection is computed only where a token is trained (`logits_to_keep`)."""
    shift_labels = batch["labels"][:, 1:]
    if batch["input_ids"].shape[0] == 1 and "position_ids" in batch:
        keep = (shift_labels[0] != IGNORE_INDEX).nonzero().flatten()
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False, logits_to_keep=keep).logits[0].float()
        loss_sum = torch.nn.functional.cross_entropy(logits, shift_labels[0, keep], reduction="sum")
        return loss_sum, int(keep.numel())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), use_cache=False).logits
    shift_logits = logits[:, :-1, :].float()
    loss_sum = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())
