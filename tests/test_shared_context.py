"""Requests that share a context prefix (the choices of a question; questions that start with the
same few-shot exemplars) are scored with one pass over it (issue 26): the same log-likelihoods
and greedy flags as lm-eval's own path, fewer tokens through the model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def _requests(model, max_length: int):
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()

    questions = []
    for ctx_len, cont_lens in ((40, (1, 4, 2, 7)), (23, (3, 3, 1)), (61, (1, 1, 1, 1)),
                               (9, (5, 2))):
        context = ids(ctx_len)
        questions.append([(None, context, ids(n)) for n in cont_lens])
    shots = ids(45)  # questions that start with the same exemplars, then differ
    for question, cont_lens in ((ids(6), (2, 5, 1)), (ids(9), (3, 1)), (ids(1), (4, 4)),
                                ([], (1, 3)), ([], (2,))):  # the exemplars alone: the prefix
        questions.append([(None, shots + question, ids(n)) for n in cont_lens])
    # a context that ends inside a word: the word's last piece starts one continuation
    word = ids(3)
    questions.append([(None, word[:2], word[2:] + ids(2)), (None, word[:2], ids(3))])
    questions.append([(None, ids(max_length + 20), ids(k)) for k in (2, 3)])  # cut from the left
    questions.append([(None, ids(17), ids(4))])  # a context scored once
    return [r for q in questions for r in q]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_shared_context_scores_equal_lm_evals_own(tiny_model, batch_size):
    from lm_eval.models.huggingface import HFLM

    from fashionfuse.evaluate.lm_eval_run import wrap_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    plain = wrap_model(model, tokenizer, batch_size, shared_contexts=False)
    shared = wrap_model(model, tokenizer, batch_size)
    own = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    requests = _requests(model, plain.max_length)
    expected = own._loglikelihood_tokens(requests, disable_tqdm=True)
    for lm in (plain, shared):
        got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
        assert [flag for _, flag in got] == [flag for _, flag in expected]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-5)
    # on the multiple-choice questions alone (each context with several choices, three with
    # the same exemplars) the shared route runs each prefix once: under half the plain
    # route's token positions
    choices = requests[:23]
    plain.tokens_through_model = shared.tokens_through_model = 0
    plain._loglikelihood_tokens(choices, disable_tqdm=True)
    shared._loglikelihood_tokens(choices, disable_tqdm=True)
    assert 0 < shared.tokens_through_model < 0.5 * plain.tokens_through_model


def test_requests_are_grouped_by_a_shared_prefix():
    from fashionfuse.evaluate.shared_context import group_by_prefix

    shots = list(range(100, 140))  # 40 tokens of few-shot exemplars every question starts with
    a, b = [5, 6, 7], [5, 6]
    requests = [(None, a, [1]), (None, b, [7, 2]), (None, a, [2, 3]), (None, [9] * 50, [1]),
                (None, [9] * 50, [2]), (None, b, [8]), (None, shots + [1, 2], [3]),
                (None, shots + [4], [5, 6]), (None, [8] * 5, [1])]
    groups, others = group_by_prefix(requests, max_length=45)
    # b is a prefix of a: one pass over b, then a's last token; the two questions after the
    # same exemplars share those 40 tokens
    assert sorted(groups) == [(2, [0, 1, 2, 5]), (40, [6, 7])]
    # rows longer than the model's window keep lm-eval's truncation; a context alone stays
    assert others == [3, 4, 8]


def test_questions_after_the_same_exemplars_are_not_merged_across_subjects():
    """Two MMLU-like subjects whose prompts share their first words (a short prefix) but each
    its own exemplars (a long one): a group per subject, not one group on the short prefix."""
    from fashionfuse.evaluate.shared_context import group_by_prefix

    head = list(range(200, 240))  # "The following are multiple choice questions about"
    requests = []
    for subject in (1, 2):
        exemplars = [subject] * 300
        for q in range(3):
            requests += [(None, head + [subject] + exemplars + [q, q], [c]) for c in (7, 8)]
    groups, others = group_by_prefix(requests, max_length=1000)
    assert others == []
    assert sorted(groups) == [(341, list(range(0, 6))), (341, list(range(6, 12)))]


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "qwen2", "gpt_neox"])
def test_shared_prefixes_keep_each_architectures_attention(tiny_model, arch):
    """Sliding windows (shorter than the contexts here), soft-capping, mixed layer types and
    partial rotary embeddings: the shared-prefix route scores what lm-eval's own path scores,
    or leaves the requests to it."""
    from lm_eval.models.huggingface import HFLM

    from fashionfuse.evaluate.lm_eval_run import wrap_model

    from .tiny_archs import tiny_model as build

    model = build(arch)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    own = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    shared = wrap_model(model, tokenizer, 4)
    requests = [r for r in _requests(model, own.max_length) if len(r[1]) + len(r[2]) < 200]
    expected = own._loglikelihood_tokens(requests, disable_tqdm=True)
    got = shared._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [flag for _, flag in got] == [flag for _, flag in expected]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-4)
    assert shared.tokens_through_model < 0.6 * sum(len(c) + len(t) - 1 for _, c, t in requests)
