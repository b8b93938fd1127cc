"""Learnable fusion weights (`method: gradient`): eq. (13) of the paper solved by gradient descent.

Base model and adapters stay frozen; the only parameters are the fusion weights w. Every LoRA
layer's scale becomes the tensor `w_i * alpha_i / r_i`, so the forward pass is the exact fused
model and autograd carries the validation loss back to w. Each step is one full pass over the
validation batches (token-weighted, combined across datasets like the search objective), then
an Adam step and a clamp to [low, high].
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..config import SearchConfig
from ..lora import set_fusion_weights
from ..train.batching import token_losses
from .objectives import ValidationLoss


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def learn_weights(model, objective: ValidationLoss, names: list[str], cfg: SearchConfig,
                  init: dict[str, float]) -> tuple[dict[str, float], list[dict]]:
    """Optimise the fusion weights on the objective; return them and the per-step history."""
    set_fusion_weights(model, {n: 1.0 for n in names})  # all active, unit scale
    layers = _lora_layers(model)
    unit = [{n: float(m.scaling[n]) for n in names if n in m.scaling} for m in layers]
    w = torch.tensor([init[n] for n in names], dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([w], lr=cfg.gradient_lr)
    z = sum(objective.weights.values())
    counts = {d: sum(int((b["labels"][:, 1:] != -100).sum()) for b in bs)
              for d, bs in objective.batches.items()}
    history = []
    try:
        for step in tqdm(range(cfg.gradient_steps), desc="learn weights", leave=False):
            opt.zero_grad()
            total = 0.0
            for d, batches in objective.batches.items():
                for b in batches:
                    for m, scales in zip(layers, unit):
                        for i, n in enumerate(names):
                            if n in scales:
                                m.scaling[n] = w[i] * scales[n]
                    loss_sum, _ = token_losses(model, b)
                    loss = loss_sum * objective.weights[d] / (counts[d] * z)
                    loss.backward()
                    total += loss.item()
            opt.step()
            with torch.no_grad():
                w.clamp_(cfg.low, cfg.high)
            history.append({"step": step + 1, "objective": total,
                            "weights": {n: round(float(x), 6) for n, x in zip(names, w.detach())}})
    finally:
        learned = {n: round(float(x), 6) for n, x in zip(names, w.detach())}
        set_fusion_weights(model, learned)  # plain float scales again
    return learned, history
