"""Tokenised examples, shared by training, the search objective and benchmarks: curated records
read and tokenised with assistant-only labels, and padded batches (the loss on them: `head_loss`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .chat_template import IGNORE_INDEX, tokenize_with_labels


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
