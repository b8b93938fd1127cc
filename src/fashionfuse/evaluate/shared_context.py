"""Score log-likelihood requests that share a context prefix with one pass over that prefix.

lm-eval's HF backend scores every (context, continuation) request as its own row, context
included: a question with four choices runs its context through the model four times (only
single-token choices share one row, through its logits cache), and the questions of an MMLU
subject or of TruthfulQA, which start with the same few-shot exemplars or primer, run that
prefix once per question. Here requests are grouped by a shared token prefix (identical
contexts, or contexts that start alike, chosen to run the fewest token positions): one forward
over the prefix keeps its KV cache; the distinct contexts' rests run in right-padded batches on
copies of it, and their continuations (but the last token) in batches on their rows of that
cache, with explicit positions and a mask over the padding between (one context a pass for
models whose attention counts cache slots: sliding windows, chunked attention). The model's own
attention runs in every pass (its masks, windows and soft-capping included), on exactly the
tokens lm-eval would score. Requests that lm-eval would truncate, a
context with one request that shares no prefix worth a pass with another, and models without a
KV cache keep lm-eval's own path.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..head_loss import causal_lm

# what one more forward pass costs, in token positions (the grouping's tie-breaker: a prefix of a
# few tokens is not worth a pass of its own)
FORWARD_OVERHEAD = 32
# padded positions of one batch of context rests (their attention runs with a padding mask)
REST_TOKENS = 4096


def cache_argument(lm) -> str | None:
    """The name under which this HFLM's decoder takes and returns its KV cache (`cache` since
    transformers 5.2x, `past_key_values` before), or None when the shared-prefix path does not
    apply (not a decoder, no cache, or no `logits_to_keep`)."""
    import inspect

    from .greedy_generation import cache_keyword

    if lm.backend != "causal":
        return None
    model = causal_lm(lm.model)
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None
    return cache_keyword(model)


def _common(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def group_by_prefix(requests, max_length: int, overhead: int = FORWARD_OVERHEAD
                    ) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Groups of requests to score on a shared prefix: (prefix length, request indices), and
    the indices of the rest (lm-eval's path: a context with one request that shares nothing
    worth a pass, or a row lm-eval would cut from the left).

    The distinct contexts are sorted, so contexts that start alike are neighbours and the
    longest prefix a run of them shares is the smallest common prefix of neighbours. A run is
    either one group (its shared prefix once, then each context's rest) or split where that
    smallest common prefix occurs, into runs that share longer prefixes (the questions of one
    MMLU subject after the subjects' common first words), whichever runs fewer token positions,
    counting `overhead` positions for each forward pass."""
    fits = [i for i, (_, ctx, cont) in enumerate(requests)
            if ctx and len(ctx) + len(cont) <= max_length + 1]
    by_context: dict[tuple, list[int]] = {}
    for i in fits:
        by_context.setdefault(tuple(requests[i][1]), []).append(i)
    contexts = sorted(by_context)
    shared = [_common(a, b) for a, b in zip(contexts, contexts[1:])]

    def plan(lo: int, hi: int) -> tuple[int, list[tuple[int, int, int]]]:
        """(token positions, [(prefix length, lo, hi)]) of the cheapest plan for contexts
        lo..hi-1."""
        if hi - lo == 1:
            return len(contexts[lo]) + overhead, [(len(contexts[lo]), lo, hi)]
        common = min(shared[lo:hi - 1])
        whole = common + overhead + sum(len(c) - common + overhead
                                        for c in contexts[lo:hi] if len(c) > common)
        cuts = [lo] + [k + 1 for k in range(lo, hi - 1) if shared[k] == common] + [hi]
        parts = [plan(a, b) for a, b in zip(cuts, cuts[1:])]
        split = sum(cost for cost, _ in parts)
        if common == 0 or split < whole:
            return split, [g for _, groups in parts for g in groups]
        return whole, [(common, lo, hi)]

    groups = plan(0, len(contexts))[1] if contexts else []
    kept = []
    for prefix, lo, hi in groups:
        members = [i for c in contexts[lo:hi] for i in by_context[c]]
        if len(members) > 1:
            kept.append((prefix, sorted(members)))
    taken = {i for _, idx in kept for i in idx}
    return kept, [i for i in range(len(requests)) if i not in taken]


def _scores(logprobs: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """Sum of the continuation's log-probabilities and whether greedy decoding picks it, from
    log-probabilities [len(continuation), vocab], as lm-eval computes them."""
    target = torch.tensor(continuation, device=logprobs.device)
    greedy = bool((logprobs.argmax(dim=-1) == target).all())
    return float(logprobs.gather(1, target[:, None]).sum()), greedy


class _Forward:
    """The model's forward under lm-eval's autocast setting, with the cache passed under the
    name this model takes it by, counting the token positions it runs."""

    def __init__(self, lm):
        self.lm, self.cache_name = lm, cache_argument(lm)

    def __call__(self, ids: torch.Tensor, cache=None, mask=None, keep: int | torch.Tensor = 0,
                 positions: torch.Tensor | None = None):
        lm = self.lm
        lm.tokens_through_model += ids.numel()
        kwargs = {self.cache_name: cache} if cache is not None else {}
        if positions is not None:
            kwargs["position_ids"] = positions
        with torch.autocast(device_type=lm.device.type, dtype=lm.mixed_precision_dtype,
                            enabled=lm.mixed_precision_dtype is not None):
            out = lm.model(input_ids=ids, attention_mask=mask, use_cache=True,
                           logits_to_keep=keep, **kwargs)
        logprobs = F.log_softmax(out.logits, dim=-1, dtype=lm.softmax_dtype)
        return logprobs, getattr(out, self.cache_name)


def _padded(rows: list[tuple[int, ...]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [n, longest] and their 0/1 mask."""
    ids = torch.zeros((len(rows), max(len(r) for r in rows)), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, device=device)
        mask[i, :len(row)] = 1
    return ids, mask


def _gaps_allowed(lm) -> bool:
    """Whether rows of one batch may hold padding between their context and continuation: the
    model's attention must depend on positions, not on cache slots, which sliding windows and
    chunked attention (counted in slots) do not."""
    config = lm.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = set(getattr(config, "layer_types", None) or [])
    return (getattr(config, "sliding_window", None) is None
            and getattr(config, "attention_chunk_size", None) is None
            and kinds <= {"full_attention"})


@torch.no_grad()
def score_group(lm, prefix: list[int], requests: list[tuple[list[int], list[int]]],
                rows_per_pass: int) -> list[tuple[float, bool]]:
    """(log-likelihood, is greedy) of each (context, continuation) whose context starts with
    `prefix`: one forward over the prefix; the rests of the distinct contexts in right-padded
    batches of `rows_per_pass` on copies of the prefix's KV cache (one context a pass for
    models with sliding windows); then the continuations' tokens but the last, in batches on
    the rows of their context's cache, with explicit positions and a mask over the padding
    between. A continuation's first token is scored by its context's last position."""
    forward, device, p = _Forward(lm), lm.device, len(prefix)
    prefix_logprobs, prefix_cache = forward(torch.tensor([prefix], device=device), keep=1)
    by_context: dict[tuple[int, ...], list[int]] = {}
    for k, (ctx, _) in enumerate(requests):
        by_context.setdefault(tuple(ctx), []).append(k)
    contexts = sorted(by_context, key=len, reverse=True)
    per_pass = rows_per_pass if _gaps_allowed(lm) else 1
    results: list = [None] * len(requests)
    for chunk in _passes(contexts, p, per_pass):
        rests = [c[p:] for c in chunk]
        if rests[0]:  # the longest first; a context that is the prefix itself has no rest
            ids, rest_mask = _padded(rests, device)
            mask = torch.cat([torch.ones((len(chunk), p), dtype=torch.long, device=device),
                              rest_mask], dim=1)
            keep = sorted({len(r) - 1 for r in rests if r})
            logprobs, cache = forward(
                ids, _repeat(prefix_cache, len(chunk)), mask,
                keep=torch.tensor(keep, device=device),
                positions=p + torch.arange(ids.shape[1], device=device).expand(len(chunk), -1))
            lasts = [logprobs[r, keep.index(len(rest) - 1)][None] if rest
                     else prefix_logprobs[0] for r, rest in enumerate(rests)]
        else:
            lasts, cache = [prefix_logprobs[0]], prefix_cache
            mask = torch.ones((1, p), dtype=torch.long, device=device)
        tails = _tails(lm, forward, cache, mask, chunk, by_context, requests, rows_per_pass)
        for r, ctx in enumerate(chunk):
            for k in by_context[ctx]:
                cont = requests[k][1]
                rows = lasts[r] if len(cont) == 1 else torch.cat([lasts[r], tails[(r, k)]])
                results[k] = _scores(rows, cont)
    return results


def _passes(contexts: list[tuple[int, ...]], p: int, rows: int) -> list[list[tuple[int, ...]]]:
    """Contexts (longest first) cut into passes of at most `rows` rows and `REST_TOKENS` padded
    rest positions (a long rest runs alone: its padding would cost more than a pass)."""
    out, current = [], []
    for ctx in contexts:
        width = len((current or [ctx])[0]) - p
        if current and (len(current) == rows or (len(current) + 1) * width > REST_TOKENS):
            out.append(current)
            current = []
        current.append(ctx)
    return out + [current] if current else out


def _repeat(cache, n: int):
    copies = copy.deepcopy(cache)
    copies.batch_repeat_interleave(n)
    return copies


def _tails(lm, forward, cache, mask, chunk, by_context, requests, rows_per_pass) -> dict:
    """Log-probabilities of each multi-token continuation's tokens but the last, run after its
    context's row of `cache` (valid where `mask` is 1): (row, request) -> [len - 1, vocab]."""
    device = lm.device
    pairs = [(r, k) for r, ctx in enumerate(chunk) for k in by_context[ctx]
             if len(requests[k][1]) > 1]
    out = {}
    for start in range(0, len(pairs), rows_per_pass):
        sub = pairs[start:start + rows_per_pass]
        ids, tail_mask = _padded([tuple(requests[k][1][:-1]) for _, k in sub], device)
        rows = torch.tensor([r for r, _ in sub], device=device)
        copies = copy.deepcopy(cache)
        copies.batch_select_indices(rows)
        lengths = mask[rows].sum(dim=1, keepdim=True)
        logprobs, _ = forward(ids, copies, torch.cat([mask[rows], tail_mask], dim=1),
                              positions=lengths + torch.arange(ids.shape[1], device=device))
        for i, (r, k) in enumerate(sub):
            out[(r, k)] = logprobs[i, :len(requests[k][1]) - 1]
    return out


def with_shared_prefixes(lm, plain_scorer, detect_batch_size):
    """A log-likelihood scorer of token requests for `lm` (HFLM's signature: requests,
    `disable_tqdm`, `override_bs`) that scores requests sharing a prefix by `score_group` and
    hands the others to `plain_scorer` (lm-eval's path), returning results in the requests'
    order; `detect_batch_size(requests, pos)` gives `batch_size: auto`'s rows."""

    def score_requests(requests, disable_tqdm: bool = False, override_bs=None):
        groups, others = group_by_prefix(requests, lm.max_length)
        results: list = [None] * len(requests)
        if others:
            picked = [requests[i] for i in others]
            for i, res in zip(others, plain_scorer(picked, disable_tqdm=disable_tqdm,
                                                   override_bs=override_bs)):
                results[i] = res
        for shared, indices in groups:
            prefix = list(requests[indices[0]][1][:shared])
            pairs = [(list(requests[i][1]), list(requests[i][2])) for i in indices]
            rows = _rows(lm, requests, indices, override_bs, detect_batch_size)
            for i, res in zip(indices, score_group(lm, prefix, pairs, rows)):
                results[i] = res
                if requests[i][0] is not None:
                    lm.cache_hook.add_partial("loglikelihood", requests[i][0], res)
        return results

    return score_requests


def _rows(lm, requests, indices: list[int], override_bs, detect_batch_size) -> int:
    """Rows a pass of this group may hold: the configured batch size, or with `auto` the one
    detected (memory-bounded, see lm_eval_model) for the group's longest full row."""
    if override_bs:
        return int(override_bs)
    if str(lm.batch_size).isdigit():
        return int(lm.batch_size)
    longest = max(indices, key=lambda i: len(requests[i][1]) + len(requests[i][2]))
    return int(detect_batch_size([requests[longest]], 0))
