"""Attention for packed rows that only computes each example's own causal block.

A packed row holds several examples whose position ids restart at 0. transformers can turn the
position resets into a block-diagonal mask for its own attention, but then still computes the
whole row x row score matrix; on GPU, flash-attention's varlen kernel avoids that. `varlen_attention`
does the same on any device: it finds the examples from the position ids and attends within
each one, so no score is computed across examples.

It reproduces everything transformers' attention modules pass to their attention function:
the softmax `scaling` (e.g. Gemma's `query_pre_attn_scalar`), per-layer `sliding_window`
(a key is seen when `0 <= q - k < window`, transformers' convention), attention-logit
`softcap` (Gemma 2) and attention sinks `s_aux` (gpt-oss: one extra logit per head). Plain
causal blocks run on SDPA; softcap and sinks run the same arithmetic as transformers' eager
attention. Anything else (an attention mask, a position bias, a non-causal module, an unknown
argument) raises `UnsupportedAttention`; `use_varlen_attention` finds that out with one tiny
forward pass before training, and training then runs unpacked (padded micro-batches, the
model's own attention), saying so once.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

NAME = "fashionfuse_varlen"

# arguments the function implements
_HANDLED = {"dropout", "scaling", "position_ids", "sliding_window", "softcap", "s_aux"}
# arguments that do not change the attention output of a training forward pass
_NEUTRAL = {"use_cache", "output_router_logits", "output_attentions", "cache_position",
            "past_key_values", "past_key_value", "layer_idx", "position_embeddings",
            "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}


class UnsupportedAttention(RuntimeError):
    """The model's attention passes something `varlen_attention` does not implement."""


def example_bounds(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the examples in one row (and the row length at the end)."""
    starts = torch.diff(position_ids, prepend=position_ids[:1]) != 1  # index 0 always starts
    return starts.nonzero().flatten().tolist() + [position_ids.numel()]


class _SizesOnce:
    """The example sizes of each row of the micro-batch's `position_ids`, computed once per
    tensor: every layer (and a checkpointed layer's recomputation) receives the same tensor, so
    the device is read once per micro-batch instead of once per layer."""

    def __init__(self):
        self._ref, self._version, self._sizes = None, None, None

    def __call__(self, position_ids: torch.Tensor, batch: int, length: int) -> list[list[int]]:
        import weakref

        if (self._ref is not None and self._ref() is position_ids
                and self._version == position_ids._version):
            return self._sizes
        rows = position_ids.expand(batch, length)
        sizes = []
        for b in range(batch):
            bounds = example_bounds(rows[b])
            sizes.append([e - s for s, e in zip(bounds, bounds[1:])])
        self._ref, self._version, self._sizes = (weakref.ref(position_ids),
                                                 position_ids._version, sizes)
        return sizes


row_sizes = _SizesOnce()


def _check_supported(module, attention_mask, kwargs: dict) -> None:
    if attention_mask is not None:
        raise UnsupportedAttention("an attention mask (e.g. ALiBi or a custom mask)")
    if kwargs.get("position_ids") is None:
        raise UnsupportedAttention("no position_ids (packed rows need them)")
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise UnsupportedAttention("non-causal attention")
    for key, value in kwargs.items():
        if key in _HANDLED or key in _NEUTRAL or key == "is_causal":
            continue
        if value is not None and value is not False:
            raise UnsupportedAttention(f"the argument {key!r}")


def _window_mask(length: int, window: int | None, device) -> torch.Tensor:
    """Boolean [length, length] mask: causal, and within `window` when given."""
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    return allowed


def _block_attention(module, q, k, v, *, scaling, window, softcap, sinks, dropout):
    """Attention of one example's block [1, heads, L, dim] (causal, window, softcap, sinks)."""
    length = q.shape[2]
    gqa = k.shape[1] != q.shape[1]
    banded = window is not None and window < length
    if softcap is None and sinks is None:
        if not banded:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                  scale=scaling, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                              attn_mask=_window_mask(length, window, q.device),
                                              enable_gqa=gqa)
    if gqa:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = _window_mask(length, window if banded else None, q.device)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    if sinks is not None:  # one extra logit per head, dropped after the softmax (gpt-oss)
        sink = sinks.reshape(1, -1, 1, 1).to(scores.dtype).expand(1, -1, length, 1)
        scores = torch.cat([scores, sink], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        probs = F.softmax(scores, dim=-1, dtype=scores.dtype)[..., :-1]
    else:
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs.to(v.dtype), v)


def varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None, compute_in: torch.dtype | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Attention per example of each packed row; same output layout as transformers' sdpa.
    `compute_in`: the dtype the blocks run in (the output is cast back to the query's): on a
    GPU the 16-bit compute dtype, so SDPA takes its flash or cuDNN kernel (see
    `devices.attention_dtype`)."""
    _check_supported(module, attention_mask, kwargs)
    batch, _heads, length, _dim = query.shape
    sizes_per_row = row_sizes(kwargs["position_ids"], batch, length)
    p = dropout if module.training else 0.0
    out_dtype = query.dtype
    if compute_in is not None and query.dtype != compute_in:
        query, key, value = query.to(compute_in), key.to(compute_in), value.to(compute_in)
    options = dict(scaling=scaling, window=kwargs.get("sliding_window"),
                   softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"), dropout=p)
    rows = []
    # split, not indexed: the backward of a split is one concatenation of the blocks' gradients,
    # where an index per block would make a zero-filled full-size gradient per block and sum them
    for sizes, q, k, v in zip(sizes_per_row, query.split(1), key.split(1), value.split(1)):
        rows.append(torch.cat([
            _block_attention(module, qb, kb, vb, **options)
            for qb, kb, vb in zip(q.split(sizes, dim=2), k.split(sizes, dim=2),
                                  v.split(sizes, dim=2))], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous().to(out_dtype), None


def _features_seen(model) -> dict[str, object]:
    """Run a tiny packed forward pass with `varlen_attention`, recording what the model's
    attention modules pass; raises UnsupportedAttention when something is not implemented."""
    from transformers import AttentionInterface

    seen: dict[str, object] = {}

    def recording(module, query, key, value, attention_mask, **kwargs):
        for k in ("sliding_window", "softcap", "s_aux"):
            if kwargs.get(k) is not None:
                seen[k] = kwargs[k]
        return varlen_attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(f"{NAME}_probe", recording)
    previous = model.config._attn_implementation  # transformers' record of the active function
    model.set_attn_implementation(f"{NAME}_probe")
    device = next(p.device for p in model.parameters())
    ids = torch.full((1, 6), 1, dtype=torch.long, device=device)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)
    try:
        with torch.no_grad():
            model(input_ids=ids, position_ids=positions, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return seen


def use_varlen_attention(model, log=print, capability=None, compute_dtype: str = "float32"
                         ) -> str | None:
    """Switch `model` to per-example attention for packed training; returns the name used.

    FlashAttention-2 where it is installed and supported (`devices.flash_attention_usable`:
    Ampere or newer) and the model uses no attention sinks; `varlen_attention` otherwise, on a
    GPU in the 16-bit compute dtype (`devices.attention_dtype`). When the model's attention does something `varlen_attention`
    does not implement, returns None and says so once: the caller trains on padded
    micro-batches with the model's own attention instead (always exact; packing with the
    model's own block-diagonal masks is not, e.g. gpt-oss's eager attention ignores them).
    """
    from transformers import AttentionInterface

    try:
        features = _features_seen(model)
    except UnsupportedAttention as exc:
        log(f"packing off: {type(model).__name__} passes {exc} to its attention, which {NAME} "
            "does not implement; training on padded micro-batches with the model's own "
            f"'{model.config._attn_implementation}' attention")
        return None
    from ..devices import attention_dtype, detect, flash_attention_usable

    cap = capability if capability is not None else detect(
        str(next(model.parameters()).device))
    if flash_attention_usable(cap) and "s_aux" not in features:
        try:
            model.set_attn_implementation("flash_attention_2")
            return "flash_attention_2"
        except (ImportError, ValueError):
            pass
    compute_in = attention_dtype(torch.float32, cap, compute_dtype)
    if compute_in == torch.float32:
        AttentionInterface.register(NAME, varlen_attention)
    else:
        AttentionInterface.register(NAME, functools.partial(varlen_attention,
                                                            compute_in=compute_in))
    model.set_attn_implementation(NAME)
    return NAME
