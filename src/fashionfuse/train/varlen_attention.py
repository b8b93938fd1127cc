"""Attention for packed rows that only computes each example's own causal block.

A packed row holds several examples whose position ids restart at 0. transformers can turn
the position resets into a block-diagonal mask for SDPA, but SDPA then still computes the whole
row x row score matrix; on GPU, flash-attention's varlen kernel avoids that. This function does
the same on any device: it finds the examples from the position ids and runs causal SDPA on each
one, so no score is computed across examples and no mask is built. Used only for training on
packed rows (`collate_packed`), where no attention mask is passed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "fashionfuse_varlen"


def example_bounds(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the examples in one row (and the row length at the end)."""
    starts = torch.diff(position_ids, prepend=position_ids[:1]) != 1  # index 0 always starts
    return starts.nonzero().flatten().tolist() + [position_ids.numel()]


def varlen_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0,
                scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal SDPA per example of each packed row; same output layout as transformers' sdpa."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or attention_mask is not None:
        raise ValueError(f"{NAME} attention needs packed position_ids and no attention mask")
    batch, _heads, length, _dim = query.shape
    position_ids = position_ids.expand(batch, length)
    gqa = key.shape[1] != query.shape[1]
    p = dropout if module.training else 0.0
    rows = []
    for b in range(batch):
        bounds = example_bounds(position_ids[b])
        rows.append(torch.cat([
            F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e],
                                           value[b:b + 1, :, s:e], dropout_p=p, is_causal=True,
                                           scale=scaling, enable_gqa=gqa)
            for s, e in zip(bounds, bounds[1:])], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def use_varlen_attention(model) -> str:
    """Switch `model` to per-example attention for packed training; returns the name used
    (flash-attention 2 where it is installed on CUDA, this module's function otherwise)."""
    from transformers import AttentionInterface

    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            model.set_attn_implementation("flash_attention_2")
            return "flash_attention_2"
        except (ImportError, ValueError):
            pass
    AttentionInterface.register(NAME, varlen_sdpa)
    model.set_attn_implementation(NAME)
    return NAME
