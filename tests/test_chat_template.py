"""Table 9 template and assistant-only label masking."""

from __future__ import annotations

from transformers import AutoTokenizer

from fashionfuse.chat_template import IGNORE_INDEX, install_chat_template, render, tokenize_with_labels

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
