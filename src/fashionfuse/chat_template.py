"""The modified LLaMA-2 conversation template (paper Table 9) and assistant-only label masking.

Rendered text, one conversation:

    <s>{system}\\n
    USER: {query 1}\\n
    ASSISTANT: {response 1}</s>\\n
    USER: {query 2}\\n
    ASSISTANT: {response 2}</s>\\n

Only the assistant spans `" {response}</s>"` are trained (eq. 5-8); the system message, user turns
and the `ASSISTANT:` prefixes are masked with -100. The same text comes out of
`tokenizer.apply_chat_template` once `install_chat_template` has put the Jinja version on a
tokenizer, so prompts at inference match the training prompts exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import UserError

IGNORE_INDEX = -100
USER_PREFIX = "USER: "
ASSISTANT_PREFIX = "ASSISTANT:"

_JINJA = (
    "{%- set system = {default_system} -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- endif -%}"
    "{{- bos_token + system + '\\n' -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- 'USER: ' + m['content'] + '\\n' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' + m['content'] + eos_token + '\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def jinja_template(default_system: str | None) -> str:
    """The Table 9 template as a Jinja chat template with `default_system` built in."""
    return _JINJA.replace("{default_system}", json.dumps(default_system or ""))


def resolve_template(tokenizer, template: str) -> str:
    """`model.chat_template` as rendered: "auto" is the tokenizer's own template ("model")
    when it has one, else the paper's ("table9")."""
    if template == "auto":
        return "model" if getattr(tokenizer, "chat_template", None) else "table9"
    return template


def install_chat_template(tokenizer, default_system: str | None) -> None:
    """Attach the Table 9 Jinja template to `tokenizer` (saved with it by save_pretrained)."""
    tokenizer.chat_template = jinja_template(default_system)


@dataclass(frozen=True)
class RenderedChat:
    text: str
    assistant_spans: list[tuple[int, int]]  # character [start, end) of each trained span


def render(messages: list[dict], system: str | None, bos: str = "<s>", eos: str = "</s>"
           ) -> RenderedChat:
    """Render user/assistant messages with the Table 9 template and locate assistant spans
    (no system message: an empty system line)."""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    parts = [bos + (system or "") + "\n"]
    spans: list[tuple[int, int]] = []
    pos = len(parts[0])
    for m in messages:
        if m["role"] == "user":
            piece = USER_PREFIX + m["content"] + "\n"
        elif m["role"] == "assistant":
            head = ASSISTANT_PREFIX
            trained = " " + m["content"] + eos
            spans.append((pos + len(head), pos + len(head) + len(trained)))
            piece = head + trained + "\n"
        else:
            raise ValueError(f"unexpected role {m['role']!r}")
        parts.append(piece)
        pos += len(piece)
    return RenderedChat("".join(parts), spans)


class ChatTemplateError(UserError, ValueError):
    """The tokenizer's own chat template cannot be used for assistant-only training."""


def render_with_tokenizer_template(tokenizer, messages: list[dict], system: str | None
                                   ) -> RenderedChat:
    """Render with the tokenizer's own chat template (`model.chat_template: model`) and locate
    each assistant turn: the text that rendering the conversation through that turn adds to
    rendering it up to the turn with a generation prompt (the reply and the template's
    end-of-turn tokens). The template must render each turn as a prefix of the next, as chat
    templates do; one that rewrites earlier turns is refused."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"{tokenizer.name_or_path}: has no chat template; use "
                                "model.chat_template: table9")
    msgs = list(messages)
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})

    def text(upto: list[dict], generation: bool) -> str:
        return tokenizer.apply_chat_template(upto, tokenize=False,
                                             add_generation_prompt=generation)

    full = text(msgs, False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before, through = text(msgs[:i], True), text(msgs[:i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatTemplateError(
                f"{tokenizer.name_or_path}: its chat template renders earlier turns differently "
                "once later ones follow, so assistant tokens cannot be located; use "
                "model.chat_template: table9")
        spans.append((len(before), len(through)))
    return RenderedChat(full, spans)


def render_chat(tokenizer, messages: list[dict], system: str | None, template: str = "table9"
                ) -> RenderedChat:
    """A conversation as training sees it: `template` "table9" (the paper's, with the
    tokenizer's bos/eos), "model" (the tokenizer's own chat template) or "auto" (the
    tokenizer's own when it has one, else table9)."""
    if resolve_template(tokenizer, template) == "model":
        return render_with_tokenizer_template(tokenizer, messages, system)
    return render(messages, system, tokenizer.bos_token or "", tokenizer.eos_token or "")


def tokenize_with_labels(
    tokenizer, messages: list[dict], system: str | None, max_len: int | None = None,
    template: str = "table9",
) -> dict[str, list[int]]:
    """Token ids and labels for one conversation; labels are -100 outside assistant spans.

    `template`: "table9" (the paper's) or "model" (the tokenizer's own chat template). A token
    is trained when its first character lies inside an assistant span, which works for any fast
    tokenizer because it tokenises the whole text once (no boundary artefacts).
    """
    chat = render_chat(tokenizer, messages, system, template)
    enc = tokenizer(chat.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    span_i = 0
    spans = chat.assistant_spans
    for tok, (start, end) in zip(ids, offsets):
        while span_i < len(spans) and start >= spans[span_i][1]:
            span_i += 1
        inside = span_i < len(spans) and spans[span_i][0] <= start < spans[span_i][1] and end > start
        labels.append(tok if inside else IGNORE_INDEX)
    if max_len is not None and len(ids) > max_len:
        ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": ids, "labels": labels}
