"""Plan optimiser steps, pack examples into rows and collate packed rows (little padding, no
attention across packed examples); tokenising and padded batches live in `examples.py`."""

from __future__ import annotations

import bisect
import math
import random

import torch

from ..chat_template import IGNORE_INDEX


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


