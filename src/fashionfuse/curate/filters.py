"""Record filters of the paper (Appendix B and section 3.1).

Each filter takes a record and returns the (possibly rewritten) record, or a `Rejection` saying
why it goes. `build_chain` returns the configured filters in order; the pipeline counts each
filter's removals for the funnel.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from ..config import FilterConfig
from .records import Record, Rejection

Filter = Callable[[Record], "Record | Rejection"]


def structure(rec: Record) -> Record | Rejection:
    """Require user/assistant alternation starting with the user; drop a trailing user turn."""
    msgs = list(rec.messages)
    while msgs and msgs[-1]["role"] == "user":
        msgs.pop()
    if not msgs:
        return Rejection(rec.id, "structure", "no assistant response")
    for i, m in enumerate(msgs):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            return Rejection(rec.id, "structure", f"turn {i} is {m['role']}, expected {expected}")
    rec.messages = msgs
    return rec


def answering_model(keep: list[str]) -> Filter:
    """Keep only records whose `model` field names one of `keep` (Appendix B: GPT-4 only)."""
    wanted = {k.lower() for k in keep}

    def apply(rec: Record) -> Record | Rejection:
        model = str(rec.meta.get("model", "")).lower()
        if model in wanted:
            return rec
        return Rejection(rec.id, "answering_model",
                         f"answered by {model or 'an unnamed model'}, not one of {sorted(wanted)}")

    return apply


def blank_response(rec: Record) -> Record | Rejection:
    """Drop records with a blank or missing assistant response."""
    for i, r in enumerate(rec.responses):
        if not r.strip():
            return Rejection(rec.id, "blank_response", f"assistant turn {i} is blank")
    return rec


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\uff07": "'"})


def _normalise_prose(text: str) -> str:
    """Lower case, typographic apostrophes as ', runs of whitespace as one space."""
    return " ".join(text.translate(_APOSTROPHES).lower().split())


def refusal(patterns: list[str]) -> Filter:
    """Drop records where the assistant refuses (case-insensitive substring patterns; curly
    apostrophes and line breaks in the response match the plain pattern)."""
    lowered = [_normalise_prose(p) for p in patterns]

    def apply(rec: Record) -> Record | Rejection:
        for i, r in enumerate(rec.responses):
            low = _normalise_prose(r)
            for p in lowered:
                if p in low:
                    return Rejection(rec.id, "refusal", f"assistant turn {i} matches {p!r}")
        return rec

    return apply


# fenced blocks (``` or ~~~, to the closing fence or the end) and inline `code` spans
_CODE = re.compile(r"(```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)|`[^`\n]+`)", re.DOTALL)


def _name_regex(name: str) -> str:
    """A proper name as written in prose: case-sensitive, with its usual spellings (an optional
    space or hyphen where the name has one or changes case: 'Chat GPT', 'GPT4', 'Open AI'), and
    a lower-case first letter when the rest carries capitals ('chatGPT', 'openAI')."""
    parts = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+(?:\.\d+)?|[^\w\s-]", name)
    if not parts or "".join(parts) != re.sub(r"[\s-]", "", name):
        return re.escape(name)
    first = parts[0]
    if len(parts) > 1 and first[0].isupper() and any(c.isupper() for c in "".join(parts[1:])):
        parts[0] = f"[{first[0]}{first[0].lower()}]{re.escape(first[1:])}"
    else:
        parts[0] = re.escape(first)
    return r"[- ]?".join([parts[0], *map(re.escape, parts[1:])])


def identity(patterns: list[str], action: str, replacement: str) -> Filter:
    """Replace (or drop records with) identity mentions such as OpenAI or ChatGPT in prose.

    Names match as written (see `_name_regex`), never inside fenced or inline code and never as
    part of a longer word or identifier, so `import openai` or `model='gpt-4'` stay as they are.
    """
    regex = re.compile(r"(?<![\w./-])(?:" + "|".join(_name_regex(p) for p in patterns)
                       + r")(?![\w])")

    def prose_hit(text: str) -> str | None:
        for k, part in enumerate(_CODE.split(text)):
            if k % 2 == 0 and (m := regex.search(part)):
                return m.group(0)
        return None

    def replace(text: str) -> str:
        return "".join(part if k % 2 else regex.sub(replacement, part)
                       for k, part in enumerate(_CODE.split(text)))

    def apply(rec: Record) -> Record | Rejection:
        texts = [m["content"] for m in rec.messages] + [rec.system or ""]
        hit = next((h for t in texts if (h := prose_hit(t))), None)
        if hit is None:
            return rec
        if action == "drop":
            return Rejection(rec.id, "identity", f"mentions {hit!r}")
        rec.messages = [dict(m, content=replace(m["content"])) for m in rec.messages]
        if rec.system:
            rec.system = replace(rec.system)
        rec.meta["identity_replaced"] = True
        return rec

    return apply


def response_length(min_chars: int, max_chars: int) -> Filter:
    """Drop records with a response shorter or longer than the bounds (length-abnormal)."""

    def apply(rec: Record) -> Record | Rejection:
        for i, r in enumerate(rec.responses):
            n = len(r.strip())
            if n < min_chars or n > max_chars:
                return Rejection(rec.id, "response_length",
                                 f"assistant turn {i} has {n} chars, bounds [{min_chars}, {max_chars}]")
        return rec

    return apply


def language(keep: list[str]) -> Filter:
    """Drop records whose text is not detected as one of `keep` (langid, model shipped with it)."""
    import langid

    identifier = langid.langid.LanguageIdentifier.from_modelstring(langid.langid.model, norm_probs=False)
    wanted = set(keep)

    def apply(rec: Record) -> Record | Rejection:
        text = " ".join(m["content"] for m in rec.messages)[:2000]
        lang, _ = identifier.classify(text)
        if lang in wanted:
            return rec
        return Rejection(rec.id, "language", f"detected language {lang!r}, keeping {sorted(wanted)}")

    return apply


DEFAULT_WORDLIST = Path(__file__).with_name("wordlists") / "unsafe_en.txt"


def read_wordlist(path: str | Path) -> list[str]:
    """Phrases from a word-list file (one a line, # comments)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")]


def toxicity(phrases: list[str]) -> Filter:
    """Drop records containing a listed violent, hateful or illegal phrase (Appendix B)."""
    regex = re.compile(r"\b(" + "|".join(re.escape(p) for p in phrases) + r")\b", re.IGNORECASE)

    def apply(rec: Record) -> Record | Rejection:
        for i, m in enumerate(rec.messages):
            hit = regex.search(m["content"])
            if hit:
                return Rejection(rec.id, "toxicity", f"turn {i} contains {hit.group(0)!r}")
        return rec

    return apply


def toxicity_classifier(model: str, labels: list[str], threshold: float) -> Filter:
    """Drop records whose text a classifier scores above `threshold` for one of `labels`."""
    from transformers import pipeline

    classify = pipeline("text-classification", model=model, top_k=None, truncation=True,
                        device="cpu")
    wanted = {label.lower() for label in labels}

    def apply(rec: Record) -> Record | Rejection:
        for i, m in enumerate(rec.messages):
            for pred in classify(m["content"])[0] if m["content"].strip() else []:
                if pred["label"].lower() in wanted and pred["score"] > threshold:
                    return Rejection(rec.id, "toxicity_classifier",
                                     f"turn {i} scored {pred['score']:.2f} for {pred['label']!r}")
        return rec

    return apply


def topics(keep: list[str], keywords: dict[str, list[str]]) -> Filter:
    """Keep records about one of the chosen topics (keyword match), as for the Samantha subset."""
    patterns = {t: re.compile(r"\b(" + "|".join(re.escape(k) for k in keywords[t]) + r")",
                              re.IGNORECASE) for t in keep}

    def apply(rec: Record) -> Record | Rejection:
        text = "\n".join(m["content"] for m in rec.messages)
        found = [t for t, rx in patterns.items() if rx.search(text)]
        if not found:
            return Rejection(rec.id, "topic", f"matches none of the kept topics {keep}")
        rec.meta["topics"] = found
        return rec

    return apply


def near_duplicates(threshold: float, ngram: int) -> Filter:
    """Drop records whose conversation is more similar than `threshold` to an earlier kept one
    (`dedup.DedupState`; the curation pipeline runs the same state over its stream)."""
    from .dedup import DedupState, NearParams, conversation_text, record_keys

    near = NearParams(threshold, ngram)
    state = DedupState(exact=False, near=near)

    def apply(rec: Record) -> Record | Rejection:
        rejection = state.check(rec.id, record_keys(rec, False, near), conversation_text(rec))
        return rec if rejection is None else rejection

    return apply


def exact_duplicates() -> Filter:
    """Drop records whose normalised conversation was already seen (first one kept)."""
    from .dedup import DedupState, record_keys

    state = DedupState(exact=True, near=None)

    def apply(rec: Record) -> Record | Rejection:
        rejection = state.check(rec.id, record_keys(rec, True, None), None)
        return rec if rejection is None else rejection

    return apply


def decontamination(index) -> Filter:
    """Drop records whose user query is more similar than the threshold to a benchmark question."""

    def apply(rec: Record) -> Record | Rejection:
        for i, q in enumerate(rec.queries):
            match = index.best_match(q)
            if match is not None:
                question = index.questions[match.question_index][:80]
                return Rejection(rec.id, "decontamination",
                                 f"user turn {i} is {match.similarity:.2f} similar to benchmark "
                                 f"question {question!r}")
        return rec

    return apply


def build_chain(cfg: FilterConfig, benchmark_index=None) -> list[tuple[str, Filter]]:
    """The configured per-record filters, in the order they run. Duplicate removal needs every
    earlier record and runs after them, in order (`dedup.DedupState`, for `dedup` and
    `near_dedup`)."""
    chain: list[tuple[str, Filter]] = [("structure", structure)]
    if cfg.keep_models:
        chain.append(("answering_model", answering_model(cfg.keep_models)))
    if cfg.drop_blank:
        chain.append(("blank_response", blank_response))
    if cfg.drop_refusals:
        chain.append(("refusal", refusal(cfg.refusal_patterns)))
    if cfg.identity.action != "off":
        chain.append(("identity", identity(cfg.identity.patterns, cfg.identity.action,
                                           cfg.identity.replacement)))
    if cfg.languages:
        chain.append(("language", language(cfg.languages)))
    if cfg.toxicity.enabled:
        phrases = [p for f in (cfg.toxicity.wordlists or [DEFAULT_WORDLIST]) for p in read_wordlist(f)]
        chain.append(("toxicity", toxicity(phrases)))
        if cfg.toxicity.classifier:
            chain.append(("toxicity_classifier", toxicity_classifier(
                cfg.toxicity.classifier, cfg.toxicity.classifier_labels,
                cfg.toxicity.classifier_threshold)))
    if cfg.topics is not None:
        chain.append(("topic", topics(cfg.topics.keep, cfg.topics.keywords)))
    chain.append(("response_length", response_length(cfg.min_response_chars, cfg.max_response_chars)))
    if benchmark_index is not None:
        chain.append(("decontamination", decontamination(benchmark_index)))
    return chain
