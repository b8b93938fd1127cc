"""Table 9 template and assistant-only label masking."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from fashionfuse.chat_template import (
    IGNORE_INDEX,
    install_chat_template,
    render,
    tokenize_with_labels,
)
from fashionfuse.cli import app

runner = CliRunner()

SYSTEM = "You are an AI assistant named FashionGPT."
CHAT = [
    {"role": "user", "content": "What colour does Alice like?"},
    {"role": "assistant", "content": "Alice likes blue."},
    {"role": "user", "content": "And Bruno?"},
    {"role": "assistant", "content": "Bruno likes red."},
    {"role": "user", "content": "Thanks. Who likes green?"},
    {"role": "assistant", "content": "Chen likes green."},
]


def test_render_matches_table9_layout():
    text = render(CHAT[:2], SYSTEM).text
    assert text == ("<s>You are an AI assistant named FashionGPT.\n"
                    "USER: What colour does Alice like?\nASSISTANT: Alice likes blue.</s>\n")


def test_jinja_template_reproduces_training_text(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    install_chat_template(tok, SYSTEM)
    assert tok.apply_chat_template(CHAT, tokenize=False) == render(CHAT, SYSTEM).text
    custom = [{"role": "system", "content": "Be brief."}] + CHAT[:2]
    assert tok.apply_chat_template(custom, tokenize=False) == render(custom, SYSTEM).text
    prompt = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("USER: What colour does Alice like?\nASSISTANT:")


def test_three_turn_chat_trains_exactly_the_assistant_spans(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ex = tokenize_with_labels(tok, CHAT, SYSTEM)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    # contiguous trained runs, decoded, are exactly the three responses with their </s>
    runs, current = [], []
    for tid, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            if current:
                runs.append(current)
                current = []
        else:
            assert lab == tid
            current.append(tid)
    if current:
        runs.append(current)
    decoded = [tok.decode(r) for r in runs]
    assert decoded == [" Alice likes blue.</s>", " Bruno likes red.</s>", " Chen likes green.</s>"]
    # everything else (system, user turns, ASSISTANT: prefixes, newlines) is masked
    masked = tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert "What colour does Alice like?" in masked and "And Bruno?" in masked
    assert "Alice likes blue" not in masked
    assert ids.count(tok.eos_token_id) == 3
    assert all(labels[i] != IGNORE_INDEX for i, t in enumerate(ids) if t == tok.eos_token_id)


def test_qa_record_trains_only_the_response(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ex = tokenize_with_labels(tok, CHAT[:2], "Answer briefly.")
    trained = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tok.decode(trained) == " Alice likes blue.</s>"


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
TWO_TURNS = [{"role": "user", "content": "capital of France?"},
             {"role": "assistant", "content": "Paris"},
             {"role": "user", "content": "and of Spain?"},
             {"role": "assistant", "content": "Madrid"}]


def test_model_template_trains_only_the_assistant_turns(tiny_model):
    from transformers import AutoTokenizer

    from fashionfuse.chat_template import IGNORE_INDEX, tokenize_with_labels

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = CHATML
    ex = tokenize_with_labels(tok, TWO_TURNS, "be brief", template="model")
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"}, *TWO_TURNS],
                                   tokenize=False)
    assert tok.decode(ex["input_ids"]).replace(" ", "") == text.replace(" ", "")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = "".join(text[s:e] for (s, e), lab in zip(enc["offset_mapping"], ex["labels"])
                      if lab != IGNORE_INDEX)
    assert "Paris" in trained and "Madrid" in trained and trained.count("<|im_end|>") == 2
    for prompt_text in ("capital", "Spain", "be brief", "<|im_start|>"):
        assert prompt_text not in trained


def test_model_template_that_rewrites_earlier_turns_is_refused(tiny_model):
    from transformers import AutoTokenizer

    from fashionfuse.chat_template import ChatTemplateError, tokenize_with_labels

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                         "{{ 'A: [earlier]\\n' }}{% else %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
                         "{% endif %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="renders earlier turns differently"):
        tokenize_with_labels(tok, TWO_TURNS, "sys", template="model")
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tokenize_with_labels(tok, TWO_TURNS, "sys", template="model")


def test_adapter_keeps_the_models_own_template(make_config, tmp_path, tiny_model):
    import shutil

    from transformers import AutoTokenizer

    model_dir = tmp_path / "instruct"
    shutil.copytree(tiny_model, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHATML
    tok.save_pretrained(model_dir)
    # the demo tokenizer spells ChatML's markers out letter by letter: a longer context
    path = make_config(model={"base": str(model_dir), "max_input_len": 512,
                              "chat_template": "model"},
                       training={"batch_size": 8, "micro_batch_size": 4, "max_steps": 1,
                                 "lora": {"r": 4, "alpha": 8}})
    assert runner.invoke(app, ["curate", str(path)]).exit_code == 0
    result = runner.invoke(app, ["train-adapter", str(path), "--adapter", "orca"])
    assert result.exit_code == 0, result.output
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "adapters" / "orca")
    assert saved.chat_template == CHATML
