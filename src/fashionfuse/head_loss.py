"""The next-token loss through the output head on the supervised positions only, chunk by chunk.

A causal LM's forward projects every position to the vocabulary: [tokens x vocab] logits, and a
loss on them makes float32, log-softmax and gradient copies of the same size; at a 49k-152k
vocabulary that is most of a QLoRA step's memory. Here the model runs with its output head
bypassed (a forward pre-hook takes the head's input and hands the head zero positions), the
hidden states of the supervised positions are gathered, and each chunk of them goes through the
head, the architecture's logit post-processing (Gemma's soft-cap, Cohere's scale, Granite's
divisor), a float32 cross-entropy and, when a gradient is wanted, its own backward at once: the
gradient with respect to the chunk's hidden states is all that outlives a chunk (the idea of
Liger's fused linear cross-entropy and of cut-cross-entropy, in plain torch, on any device).

Exact by construction (the same operations in the same dtypes on each position, only fewer
positions at a time), and checked once per model: `token_losses` compares the chunked head with
the model's own logits on a few positions and takes the plain full-logits path, saying so, for a
model whose head does something else, or whose output head is being trained.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F

from .chat_template import IGNORE_INDEX

log = logging.getLogger(__name__)

CHUNK_LOGITS = 1 << 23  # logits per chunk (8M: 32 MB in float32): rows = this // vocabulary
_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def causal_lm(model) -> torch.nn.Module:
    """The transformers model inside DistributedDataParallel and PEFT wrappers."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def logit_post_processing(lm: torch.nn.Module):
    """The elementwise step transformers applies to the head's output for this architecture:
    Gemma 2/3's final soft-cap (cap * tanh(x / cap)), Cohere's `logit_scale` product,
    Granite's `logits_scaling` divisor; identity for the rest."""
    cfg = lm.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(lm, "logit_scale", None) if isinstance(getattr(lm, "logit_scale", None),
                                                           (int, float)) else None
    divisor = getattr(cfg, "logits_scaling", None)

    def post(logits: torch.Tensor) -> torch.Tensor:
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        return logits
    return post


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Summed float32 cross-entropy of head(hidden) against labels, a chunk of rows at a time;
    the gradient with respect to `hidden` is computed chunk by chunk during the forward.

    The cross-entropy's own gradient is written in place: softmax - one-hot, from the chunk's
    float32 logits and their log-sum-exp (two passes over the chunk instead of the six or so of
    log-softmax, NLL and their backwards); the head and the post-processing are differentiated
    by autograd."""

    @staticmethod
    def forward(ctx, hidden, labels, head, post, rows):
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows].detach().requires_grad_(want_grad)
            target = labels[start:start + rows, None]
            with torch.enable_grad() if want_grad else torch.no_grad():
                logits = post(head(h))
            z = logits.detach().float()
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            total += (lse - z.gather(1, target)).sum()
            if want_grad:
                # in place, also where z is the logits themselves: neither the head nor the
                # post-processing saves its output for the backward (autograd's version
                # counter would refuse it otherwise)
                probs = z.sub_(lse).exp_().scatter_add_(1, target, torch.full_like(
                    target, -1, dtype=z.dtype))
                grad[start:start + rows] = torch.autograd.grad(logits, h,
                                                               probs.to(logits.dtype))[0]
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def chunked_head_loss(model, hidden: torch.Tensor, labels: torch.Tensor,
                      rows: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of the model's output head on `hidden` [N, hidden] against
    `labels` [N], never holding more than `rows` rows of logits (default: CHUNK_LOGITS)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    rows = rows or max(16, CHUNK_LOGITS // head.weight.shape[0])
    return _ChunkedHeadCrossEntropy.apply(hidden, labels, head, logit_post_processing(lm), rows)


def hidden_before_head(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final hidden states [batch, positions, hidden] the output head would read, from one
    forward of `model` (wrappers included, so DDP and PEFT work as usual) with the head given
    zero positions."""
    head = causal_lm(model).get_output_embeddings()
    captured: list[torch.Tensor] = []

    def bypass(_module, args):
        captured.append(args[0])
        return (args[0][..., :0, :],)
    handle = head.register_forward_pre_hook(bypass)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
              position_ids=batch.get("position_ids"), use_cache=False)
    finally:
        handle.remove()
    return captured[0]


def chunked_head_applies(model, batch: dict[str, torch.Tensor]) -> bool:
    """Whether the chunked head reproduces this model's own logits (checked once per model, on
    the first few positions of `batch`) and its output head is frozen."""
    lm = causal_lm(model)
    if lm in _CHECKED:
        return _CHECKED[lm]
    head = lm.get_output_embeddings()
    ok = head is not None and not any(p.requires_grad for p in head.parameters())
    if ok:
        seen: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        ids = batch["input_ids"][:1, :8]
        modes = {m: m.training for m in lm.modules()}
        lm.eval()  # no dropout: the check must not draw from the training's random stream
        try:
            with torch.no_grad():
                logits = lm(input_ids=ids, use_cache=False).logits
                mine = logit_post_processing(lm)(head(seen[0]))
        finally:
            handle.remove()
            for m, training in modes.items():
                m.training = training
        ok = mine.shape == logits.shape and torch.equal(mine, logits)
        if not ok:
            log.warning("%s: the chunked output head does not reproduce the model's logits; "
                        "the loss uses the full logits", type(lm).__name__)
    _CHECKED[lm] = ok
    return ok


def loss_path(model) -> str | None:
    """Which loss ran for `model`: "chunked output head" (plain torch, every device),
    "full logits", or None before its first loss."""
    checked = _CHECKED.get(causal_lm(model))
    return None if checked is None else ("chunked output head" if checked else "full logits")


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over trained tokens, and how many tokens were trained.

    `use_cache=False` matters for packed rows: transformers only derives the per-example
    attention blocks from position ids when no KV cache is passed. Only the trained positions
    go through the output head, in chunks (`chunked_head_loss`), where the model allows it."""
    shift_labels = batch["labels"][:, 1:]
    keep = shift_labels != IGNORE_INDEX
    if chunked_head_applies(model, batch):
        hidden = hidden_before_head(model, batch)[:, :-1][keep]
        return chunked_head_loss(model, hidden, shift_labels[keep]), int(keep.sum())
    return full_logits_loss(model, batch)


@torch.no_grad()
def summed_loss(model, batches: list[dict[str, torch.Tensor]], total: float = 0.0,
                tokens: int = 0) -> tuple[float, int]:
    """`total` and `tokens` plus the summed next-token loss over the trained tokens of
    `batches` and their count, without gradients (validation curves; the search's validation
    loss, stage after stage)."""
    for b in batches:
        s, n = token_losses(model, b)
        total, tokens = total + s.item(), tokens + n
    return total, tokens


def full_logits_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The plain path: every position through the head, then the loss on the trained ones (what
    HF's own loss does); the reference `token_losses` is tested against."""
    shift_labels = batch["labels"][:, 1:]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), use_cache=False).logits
    shift_logits = logits[:, :-1, :].float()
    loss_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                               shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())
