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

On CUDA, where liger-kernel is installed, Liger's fused linear cross-entropy (Triton) computes
the same summed loss instead, for heads it implements (a plain `nn.Linear`, no post-processing
but a soft-cap). It is taken only after agreeing with the chunked path on the model's first
batch (loss and the gradient with respect to the hidden states, float32 tolerances); otherwise
the chunked path runs, saying so. `loss_path` tells which ran (the trainer's manifest records
it). cut-cross-entropy is not used: its kernel drops gradient entries below a threshold by
default and computes in TF32, so it does not give the plain path's gradients.
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
# per model: the fused kernel that agreed with the chunked path, or None (the chunked path)
_FUSED: weakref.WeakKeyDictionary[torch.nn.Module, object] = weakref.WeakKeyDictionary()


def causal_lm(model) -> torch.nn.Module:
    """The transformers model inside DistributedDataParallel and PEFT wrappers."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def logit_post_settings(lm: torch.nn.Module) -> tuple[float | None, float | None, float | None]:
    """What transformers applies to the head's output for this architecture, None where it
    does not: Gemma 2/3's final soft-cap, Cohere's `logit_scale` product, Granite's
    `logits_scaling` divisor."""
    cfg = lm.config
    scale = getattr(lm, "logit_scale", None)
    return (getattr(cfg, "final_logit_softcapping", None),
            scale if isinstance(scale, (int, float)) else None,
            getattr(cfg, "logits_scaling", None))


def logit_post_processing(lm: torch.nn.Module):
    """The elementwise step transformers applies to the head's output for this architecture
    (`logit_post_settings`): cap * tanh(x / cap), then the scale, then the divisor; identity
    for the rest."""
    cap, scale, divisor = logit_post_settings(lm)

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
        # the step's factor (weight x processes / step tokens) applied in float32 and rounded
        # once: rounded to bfloat16 first it is up to 0.4 % off
        return (grad.float() * grad_total.float()).to(grad.dtype), None, None, None, None


def chunked_head_loss(model, hidden: torch.Tensor, labels: torch.Tensor,
                      rows: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of the model's output head on `hidden` [N, hidden] against
    `labels` [N], never holding more than `rows` rows of logits (default: CHUNK_LOGITS); through
    a fused kernel where one applies and agreed with this path (`fused_kernel`)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    rows = rows or max(16, CHUNK_LOGITS // head.weight.shape[0])
    post = logit_post_processing(lm)
    if lm not in _FUSED:
        _FUSED[lm] = _agreeing_kernel(lm, hidden, labels, head, post, rows)
    kernel = _FUSED[lm]
    if kernel is not None:
        return kernel(hidden, labels)
    return _ChunkedHeadCrossEntropy.apply(hidden, labels, head, post, rows)


class FusedKernel:
    """A fused head + cross-entropy: `name`, and `loss(hidden, labels)`, the summed loss."""

    def __init__(self, name: str, loss):
        self.name, self.loss = name, loss

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(hidden, labels)


def fused_kernel(lm: torch.nn.Module, hidden: torch.Tensor) -> FusedKernel | None:
    """Liger's fused linear cross-entropy for `lm`'s head where it applies: CUDA tensors,
    liger-kernel importable, the head a plain `nn.Linear` in `hidden`'s dtype, and no logit
    post-processing but Gemma's soft-cap; None elsewhere."""
    if not hidden.is_cuda:
        return None
    head = lm.get_output_embeddings()
    cap, scale, divisor = logit_post_settings(lm)
    if (type(head) is not torch.nn.Linear or head.weight.dtype != hidden.dtype
            or scale is not None or divisor is not None):
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:  # not installed, or no Triton
        return None

    def loss(h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return liger_fused_linear_cross_entropy(input=h, weight=head.weight, target=labels,
                                                bias=head.bias, reduction="sum", softcap=cap)
    return FusedKernel("liger fused linear cross-entropy", loss)


def _agreeing_kernel(lm, hidden, labels, head, post, rows) -> FusedKernel | None:
    """`fused_kernel(lm, hidden)` if its loss and gradient on the first rows of this batch
    agree with the chunked path's (loss within 1e-4 relative, gradient within 1e-4 of its
    largest entry), else None, saying why."""
    kernel = fused_kernel(lm, hidden)
    if kernel is None:
        return None
    n = min(64, hidden.shape[0])
    results = []
    for fn in (kernel, lambda h, y: _ChunkedHeadCrossEntropy.apply(h, y, head, post, rows)):
        h = hidden[:n].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            total = fn(h, labels[:n])
            results.append((float(total.detach()), torch.autograd.grad(total, h)[0]))
    (mine, grad_mine), (plain, grad_plain) = results
    scale = float(grad_plain.abs().max()) + 1e-12
    if (abs(mine - plain) <= 1e-4 * abs(plain) + 1e-6
            and float((grad_mine - grad_plain).abs().max()) <= 1e-4 * scale):
        return kernel
    log.warning("%s: %s disagrees with the chunked output head (loss %.6g vs %.6g); using the "
                "chunked head", type(lm).__name__, kernel.name, mine, plain)
    return None


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
    """Which loss ran for `model`: "chunked output head" (plain torch, every device), a fused
    kernel's name ("liger fused linear cross-entropy"), "full logits", or None before its first
    loss."""
    lm = causal_lm(model)
    checked = _CHECKED.get(lm)
    if checked is None:
        return None
    if not checked:
        return "full logits"
    kernel = _FUSED.get(lm)
    return kernel.name if kernel is not None else "chunked output head"


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
