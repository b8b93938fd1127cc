"""Held-out objectives for fusion-weight search (lower is better)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..rundir import RunLayout
from ..train.batching import collate, load_records, token_losses, tokenize_records


@dataclass
class ValidationLoss:
    """Token-weighted validation loss per dataset, combined by a weighted mean across datasets.

    The validation splits are tokenised and batched once; each candidate costs only forward
    passes of the resident model.
    """

    batches: dict[str, list[dict[str, torch.Tensor]]]
    weights: dict[str, float]

    @classmethod
    def from_config(cls, cfg: RunConfig, tokenizer, device: str) -> "ValidationLoss":
        layout = RunLayout(cfg.run_dir)
        obj = cfg.search.objective
        names = obj.datasets or cfg.search_adapters
        batches = {}
        for name in names:
            path = layout.curated(name) / "validation.jsonl"
            if not path.exists():
                raise FileNotFoundError(f"{path}: validation split missing (run curate)")
            ex = tokenize_records(load_records(path, obj.max_samples_per_dataset), tokenizer,
                                  cfg.model.system_message, cfg.model.max_input_len)
            ex.sort(key=lambda e: len(e["input_ids"]))
            bs = cfg.search.batch_size
            batches[name] = [{k: v.to(device) for k, v in collate(ex[i:i + bs], tokenizer.pad_token_id).items()}
                             for i in range(0, len(ex), bs)]
        weights = {n: (obj.dataset_weights or {}).get(n, 1.0) for n in names}
        return cls(batches, weights)

    @torch.no_grad()
    def per_dataset(self, model) -> dict[str, float]:
        out = {}
        for name, batches in self.batches.items():
            total, count = 0.0, 0
            for b in batches:
                s, n = token_losses(model, b)
                total += s.item()
                count += n
            out[name] = total / max(count, 1)
        return out

    @torch.no_grad()
    def staged(self, model, fractions: list[float]):
        """Yield (fraction, per-dataset losses) on growing slices of every validation split.

        Each stage only runs the batches the previous stages did not, so a candidate stopped
        after the first stage costs only that stage's share of the full evaluation.
        """
        sums = {n: [0.0, 0] for n in self.batches}
        done = {n: 0 for n in self.batches}
        for frac in fractions:
            for name, batches in self.batches.items():
                upto = max(1, round(len(batches) * frac))
                for b in batches[done[name]:upto]:
                    s, n = token_losses(model, b)
                    sums[name][0] += s.item()
                    sums[name][1] += n
                done[name] = max(done[name], upto)
            yield frac, {n: v[0] / max(v[1], 1) for n, v in sums.items()}

    def combine(self, losses: dict[str, float]) -> float:
        z = sum(self.weights.values())
        return sum(self.weights[n] * losses[n] for n in losses) / z
