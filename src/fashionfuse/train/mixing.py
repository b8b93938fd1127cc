"""Data mixing for one adapter trained on several datasets (`adapters[].mix`).

Without `mix` an adapter trains on its datasets concatenated, so each contributes what it has:
a large chat dump drowns a small QA set. With `mix: {dataset: share}` the adapter gets the
same budget of *supervised* tokens as the concatenation (the tokens the loss trains on: the
assistant turns, not the system line or user turns the labels mask out), and each dataset
contributes `share / sum(shares)` of it: its examples in a seeded random order, taken until its
supervised-token target is reached (the order repeats, freshly shuffled, when the share asks
for more than the dataset has), then all of them shuffled together, so each step's batch is
a seeded draw from the mixture (as LLaMA-Factory's `interleave_probs` samples). What each
dataset contributed (examples, supervised and input tokens, passes over it) goes into the
adapter's manifest.
"""

from __future__ import annotations

import hashlib
import random

from ..chat_template import IGNORE_INDEX


def _rng(seed: int, name: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:mix:{name}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def supervised_tokens(example: dict) -> int:
    """Tokens of `example` the loss trains on (labels after the first position not ignored),
    as the trainer counts them."""
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


def mix_examples(per_dataset: dict[str, list[dict]], shares: dict[str, float], seed: int
                 ) -> tuple[list[dict], dict[str, dict]]:
    """The mixed training examples and, per dataset, what it contributed: its normalised
    share, supervised-token target, supervised and input tokens and examples taken, and passes
    over its examples."""
    tokens = {d: [supervised_tokens(e) for e in ex] for d, ex in per_dataset.items()}
    budget = sum(sum(t) for t in tokens.values())
    total_share = sum(shares.values())
    mixed, record = [], {}
    for name, examples in per_dataset.items():
        share = shares[name] / total_share
        target = round(share * budget)
        rng, taken, used, inputs, passes = _rng(seed, name), [], 0, 0, 0
        while used < target and examples:
            order = list(range(len(examples)))
            rng.shuffle(order)
            passes += 1
            for i in order:
                if used >= target:
                    break
                taken.append(examples[i])
                used += tokens[name][i]
                inputs += len(examples[i]["input_ids"])
        mixed += taken
        record[name] = {"share": round(share, 6), "target_supervised_tokens": target,
                        "supervised_tokens": used, "input_tokens": inputs,
                        "examples": len(taken), "passes": passes}
    _rng(seed, "all").shuffle(mixed)
    return mixed, record
