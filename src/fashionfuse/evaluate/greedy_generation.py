"""Batched greedy generation that drops each row from the batch as soon as it is finished.

`transformers`' `generate` runs a batch until its *last* row stops: a row that met its stop
sequence keeps being computed (and padded) while one straggler writes on to `max_new_tokens`.
On GSM8K 5-shot with SmolLM2 most answers end after ~50 tokens and a few run to the limit, so a
batch of 16 costs more than 16 single-row generations (`scripts/bench_eval.py --generate`).
Here a finished row leaves the batch and the KV cache (`Cache.batch_select_indices`), so each
step costs only the rows still writing.

Same decisions as `generate` in greedy mode: left-padded prompts with position ids counted
from each row's first real token, the argmax of the last position's logits, a row finished
when it emits one of the generation config's end-of-sequence ids or when its generated text
(decoded without skipping special tokens, as lm-eval's stop criterion decodes it) contains one
of the stop strings, finished rows padded with `pad_id`. `plain_greedy` says when a request is
plain greedy decoding and nothing else (no sampling, beams or logits processors), the only case
this loop reproduces.
"""

from __future__ import annotations

import torch

# generation settings that change greedy decisions when set (logits processors, beams, ...):
# a model whose generation config sets any of them away from its neutral value is left to
# `generate`
_NEUTRAL = {
    "num_beams": (1, None), "num_beam_groups": (1, None), "penalty_alpha": (None,),
    "repetition_penalty": (1.0, None), "encoder_repetition_penalty": (1.0, None),
    "no_repeat_ngram_size": (0, None), "encoder_no_repeat_ngram_size": (0, None),
    "bad_words_ids": (None,), "min_length": (0, None), "min_new_tokens": (None, 0),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0),
    "force_words_ids": (None,), "constraints": (None,), "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0), "watermarking_config": (None,), "assistant_model": (None,),
    "prompt_lookup_num_tokens": (None,),
}
# per-call generation kwargs this loop understands (lm-eval adds the mask; temperature 0 and
# do_sample False are how it asks for greedy)
_CALL_KEYS = {"attention_mask", "do_sample", "temperature"}


def plain_greedy(generation_config, kwargs: dict) -> bool:
    """Whether `generate(**kwargs)` on a model with this generation config is plain greedy
    decoding (so `greedy_generate` returns the same tokens)."""
    if set(kwargs) - _CALL_KEYS:
        return False
    if kwargs.get("do_sample") not in (False, None) or kwargs.get("temperature") not in (0.0, None):
        return False
    if kwargs.get("do_sample") is None and getattr(generation_config, "do_sample", False):
        return False
    return all(getattr(generation_config, key, None) in neutral for key, neutral in _NEUTRAL.items())


def cache_keyword(model) -> str | None:
    """The name under which the decoder takes and returns its KV cache (`cache` since
    transformers 5.2x, `past_key_values` before; None: it takes none)."""
    import inspect

    from ..head_loss import causal_lm

    params = inspect.signature(causal_lm(model).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def eos_ids(generation_config) -> set[int]:
    """The end-of-sequence ids `generate` stops a row at."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _prefill_each(model, input_ids, mask, cache_name: str, extra: dict):
    """Each prompt through the model on its own (no padding), their caches stacked into one
    left-padded batch cache; (cache, last logits), or None when a layer's cache is not a plain
    growing one (sliding windows, quantised caches: then the batch is prefilled together)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    length = input_ids.shape[1]
    caches, logits = [], []
    for row in range(input_ids.shape[0]):
        real = int(mask[row].sum())
        out = model(input_ids=input_ids[row:row + 1, length - real:], use_cache=True, **extra)
        cache = getattr(out, cache_name)
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            return None
        caches.append(cache)
        logits.append(out.logits[:, -1])

    def padded(tensors):  # [1, heads, n_i, dim] each -> [rows, heads, length, dim], left-padded
        return torch.cat([torch.nn.functional.pad(t, (0, 0, length - t.shape[-2], 0))
                          for t in tensors])

    layers = [(padded([c.layers[i].keys for c in caches]),
               padded([c.layers[i].values for c in caches])) for i in range(len(caches[0].layers))]
    return DynamicCache(ddp_cache_data=layers), torch.cat(logits)


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                    max_new_tokens: int, stop: list[str], tokenizer, pad_id: int,
                    logits_to_keep: bool = True, prefill_each: bool = False) -> torch.Tensor:
    """Prompts (left-padded, with their mask) followed by their greedy continuations, padded
    with `pad_id` to the longest: shape (rows, prompt length + longest continuation).
    `prefill_each`: run each prompt alone before decoding together (faster on a CPU, where a
    padded, masked batch of long prompts costs about twice the separate passes)."""
    rows, prompt_len = input_ids.shape
    ends, cache_name = eos_ids(model.generation_config), cache_keyword(model)
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    extra = {"logits_to_keep": 1} if logits_to_keep else {}
    each = _prefill_each(model, input_ids, mask, cache_name, extra) if prefill_each else None
    if each is not None:
        cache, logits = each
    else:
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                    use_cache=True, **extra)
        cache, logits = getattr(out, cache_name), out.logits[:, -1]
    active = list(range(rows))  # original row index of each row still in the batch
    next_pos = positions[:, -1] + 1
    generated: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)
        keep = []
        for i, (row, token) in enumerate(zip(active, tokens.tolist())):
            generated[row].append(token)
            done = token in ends
            if not done and stop:
                text = tokenizer.decode(generated[row], skip_special_tokens=False)
                done = any(s in text for s in stop)
            if not done:
                keep.append(i)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):  # finished rows leave the batch and the cache
            index = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(index)
            tokens, mask, next_pos = tokens[index], mask[index], next_pos[index]
            active = [active[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask,
                    position_ids=next_pos[:, None], use_cache=True, **{cache_name: cache})
        cache, logits = getattr(out, cache_name), out.logits[:, -1]
        next_pos = next_pos + 1
    longest = max(len(g) for g in generated)
    tail = torch.full((rows, longest), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    for row, g in enumerate(generated):
        tail[row, :len(g)] = torch.tensor(g, dtype=input_ids.dtype)
    return torch.cat([input_ids, tail], dim=1)
