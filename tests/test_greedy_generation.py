"""Greedy `generate_until` with finished rows leaving the batch: the same texts as lm-eval's
default (HFLM, one request at a time, transformers' `generate`), rows really dropped, and
anything but plain greedy decoding left to `generate`."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from fashionfuse.evaluate.greedy_generation import greedy_generate, plain_greedy

PROMPTS = ["The weather today is", "Alice likes", "What colour does Bruno like? Which",
           "The train leaves the station every", "A good question deserves a", "Many birds fly",
           "The opposite of hot is", "A cow says"]


def _requests(gen_kwargs: dict):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="generate_until", doc={}, arguments=(p, dict(gen_kwargs)),
                     idx=0) for p in PROMPTS]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model)


def test_same_texts_as_lm_evals_default_with_rows_dropped(tiny, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from fashionfuse.evaluate import lm_eval_model
    from fashionfuse.evaluate.lm_eval_run import wrap_model

    model, tok = tiny
    lengths = []

    def counting(*args, **kwargs):
        out = greedy_generate(*args, **kwargs)
        prompt = args[1].shape[1]
        lengths.extend(int((row[prompt:] != kwargs["pad_id"]).sum()) for row in out)
        return out

    monkeypatch.setattr(lm_eval_model, "greedy_generate", counting)
    requests = _requests({"until": ["."], "max_gen_toks": 24, "do_sample": False})
    reference = HFLM(pretrained=model, tokenizer=tok, batch_size=1).generate_until(requests)
    ours = wrap_model(model, tok, 8).generate_until(requests)
    assert ours == reference
    assert len(lengths) == len(PROMPTS)  # one batch, through the row-dropping loop
    assert len(set(lengths)) > 1  # rows finished at different steps: some left early
    assert any(text for text in reference)


def test_sampling_goes_to_generate(tiny, monkeypatch):
    from fashionfuse.evaluate import lm_eval_model
    from fashionfuse.evaluate.lm_eval_run import wrap_model

    model, tok = tiny
    monkeypatch.setattr(lm_eval_model, "greedy_generate",
                        lambda *a, **k: pytest.fail("sampling must not take the greedy loop"))
    torch.manual_seed(0)
    out = wrap_model(model, tok, 8).generate_until(
        _requests({"until": ["."], "max_gen_toks": 8, "do_sample": True, "temperature": 0.7}))
    assert len(out) == len(PROMPTS)


def test_plain_greedy_only_without_processors():
    neutral = GenerationConfig()
    assert plain_greedy(neutral, {"attention_mask": None, "do_sample": False})
    assert plain_greedy(neutral, {"attention_mask": None})
    assert not plain_greedy(neutral, {"do_sample": True, "temperature": 0.7})
    assert not plain_greedy(neutral, {"do_sample": False, "top_k": 5})  # an unknown kwarg
    for setting in ({"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 3}, {"num_beams": 4},
                    {"suppress_tokens": [5]}, {"do_sample": True}):
        assert not plain_greedy(GenerationConfig(**setting), {"attention_mask": None}), setting


def test_sliding_window_model_matches_generate():
    """A tiny random Gemma-2 (sliding-window and global layers, soft-capping): the loop's
    tokens equal `generate`'s, with rows ending at an end-of-sequence id dropped early."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gemma2", vocab_size=96, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, sliding_window=6, max_position_embeddings=128,
                               pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, 96, (5, 12))
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 5, 1, 7)):  # left padding of different lengths
        ids[row, :pad], mask[row, :pad] = 0, 0
    # the end-of-sequence id: the token some row emits first, so that row leaves early
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, 12:]
    model.generation_config.eos_token_id = int(free[1, 2])
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                              do_sample=False, pad_token_id=0)
    for each in (False, True):  # sliding-window caches: prefilled together either way
        ours = greedy_generate(model, ids, mask, max_new_tokens=10, stop=[], tokenizer=None,
                               pad_id=0, prefill_each=each)
        assert torch.equal(ours, expected[:, :ours.shape[1]])
        assert (expected[:, ours.shape[1]:] == 0).all()  # generate only padded beyond our end


def test_prompts_prefilled_one_by_one_decode_like_a_padded_batch(tiny):
    """The CPU route (each prompt prefilled alone, the caches stacked left-padded) gives the
    tokens of the padded batch prefill and of `generate`."""
    model, tok = tiny
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    expected = model.generate(**enc, max_new_tokens=12, do_sample=False,
                              pad_token_id=tok.pad_token_id)
    for each in (False, True):
        ours = greedy_generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=12,
                               stop=[], tokenizer=tok, pad_id=tok.pad_token_id, prefill_each=each)
        assert torch.equal(ours, expected[:, :ours.shape[1]]), each


def test_a_peft_model_generates_like_lm_evals_default(tiny):
    """Through a PeftModel (how fused adapters are scored): the same texts as HFLM at batch 1."""
    import copy

    from lm_eval.models.huggingface import HFLM
    from peft import LoraConfig, get_peft_model

    from fashionfuse.evaluate.lm_eval_run import wrap_model

    model, tok = tiny
    torch.manual_seed(1)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    requests = _requests({"until": ["."], "max_gen_toks": 16, "do_sample": False})
    reference = HFLM(pretrained=peft, tokenizer=tok, batch_size=1).generate_until(requests)
    assert wrap_model(peft, tok, 8).generate_until(requests) == reference
    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=1).generate_until(requests)
    assert reference != plain  # the adapter changed what is generated
