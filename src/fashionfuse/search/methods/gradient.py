"""`gradient`: learnable fusion weights, eq. (13) of the paper solved by gradient descent.

Base model and adapters stay frozen; the only parameters are the fusion weights w: one per
adapter, or with `granularity: layer | module` one per adapter and block (and projection),
optionally tied together by a smoothness penalty across blocks. Every LoRA layer's scale
becomes the tensor `w * alpha_i / r_i` (`adapters.peft_layers.tensor_fusion_weights`), so the
forward pass is the exact fused model and autograd carries the validation loss back to w. Each
step is one full pass over the validation batches (token-weighted, combined across datasets like
the search objective), then an Adam step and a clamp to [low, high]. The start point and the
learned weights are stored as two trials.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ...config import SearchConfig
from ...console import progress_file
from ...head_loss import token_losses
from ...adapters.weight_keys import neighbours
from ...adapters.peft_layers import tensor_fusion_weights
from ...adapters.runtime import set_fusion_weights
from ..study import SearchContext, evaluate_candidate, finished
from . import grid

# the search settings this method reads (beside the common ones): its fingerprint's part
SETTINGS = ("gradient_steps", "gradient_lr", "gradient_init", "smoothness", "low", "high")

sampler = grid.sampler
distributions = grid.distributions


def learn_weights(model, objective, names: list[str], cfg: SearchConfig,
                  init: dict[str, float]) -> tuple[dict[str, float], list[dict]]:
    """Optimise the fusion weights (one per adapter, or per adapter and block/projection at
    `cfg.granularity`) on a validation-loss objective, plus `cfg.smoothness` times the squared
    differences of an adapter's weights in consecutive blocks; return them and the history."""
    data = objective.data
    keys, apply = tensor_fusion_weights(model, names, cfg.granularity)
    # on the model's device: each layer's scale is a slice of it, read without a copy per layer
    device = next(model.parameters()).device
    w = torch.tensor([init[k] for k in keys], dtype=torch.float32, device=device,
                     requires_grad=True)
    index = {k: i for i, k in enumerate(keys)}
    pairs = [(index[a], index[b]) for a, b in neighbours(keys)] if cfg.smoothness else []
    opt = torch.optim.Adam([w], lr=cfg.gradient_lr)
    z = sum(data.weights.values())
    counts = {d: sum(int((b["labels"][:, 1:] != -100).sum()) for b in bs)
              for d, bs in data.batches.items()}
    history = []
    try:
        for step in tqdm(range(cfg.gradient_steps), desc="learn weights", leave=False,
                         file=progress_file()):
            opt.zero_grad()
            total = torch.zeros((), dtype=torch.float64, device=device)
            for d, batches in data.batches.items():
                for b in batches:
                    apply(w)
                    loss_sum, _ = token_losses(model, b)
                    loss = loss_sum * data.weights[d] / (counts[d] * z)
                    loss.backward()
                    total += loss.detach()
            if pairs:
                penalty = cfg.smoothness * sum((w[i] - w[j]) ** 2 for i, j in pairs)
                penalty.backward()
                total += penalty.detach()
            opt.step()
            with torch.no_grad():
                w.clamp_(cfg.low, cfg.high)
            history.append({"step": step + 1, "objective": float(total),  # one read a step
                            "weights": {k: round(x, 6) for k, x in zip(keys, w.tolist())}})
    finally:
        learned = {k: round(x, 6) for k, x in zip(keys, w.tolist())}
        set_fusion_weights(model, learned, names, cfg.granularity)  # plain float scales again
    return learned, history


def run(ctx: SearchContext) -> None:
    """Learn the weights from the start point; store both as trials (once)."""
    from ..pipeline import SearchError

    if not ctx.objective.differentiable:
        raise SearchError(f"search.method: gradient needs a differentiable objective (val_loss), "
                          f"not {ctx.cfg.search.objective.type}")
    if any(t.user_attrs.get("point") == "learned" for t in finished(ctx.study)):
        print("search: learned weights already stored")
        return
    cfg = ctx.cfg.search
    start = (cfg.low + cfg.high) / 2 if cfg.gradient_init is None else cfg.gradient_init
    init = {k: float(start) for k in ctx.weight_names}
    learned, history = learn_weights(ctx.model, ctx.objective, ctx.names, cfg, init)
    evaluate_candidate(ctx, init, {"point": "start"})
    evaluate_candidate(ctx, learned, {"point": "learned", "history": history})
