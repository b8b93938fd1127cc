"""The embedded demo: synthetic raw sources, local benchmark tasks and a tiny Llama base model.

Everything here is generated from fixed fact tables and a seed, so `scripts/build_demo.py`
rebuilds the same files. Three sources carry three distinct skills, so adapters trained on them
differ measurably:

* `chat`   ShareGPT-style multi-turn chats about who likes which colour (with a `model` field):
           4-10 turns, each answer followed by small talk, so chats carry most of the tokens
           (as ShareGPT does beside short QA sets: mixed into one adapter, the token-weighted
           loss gives the short QA skills a small share of every update),
* `orca`   OpenOrca-style system/question/response about opposites,
* `alpaca` Alpaca-style instruction/input/output about animal sounds.

The raw files also carry the defects the curation filters exist for (answers by another model,
blank answers, refusals, identity mentions, duplicates, a malformed row). The base model is
pretrained briefly on declarative statements of the same facts plus filler text, so it knows
the facts but not the question-answer format the adapters teach.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PEOPLE = [
    "Alice", "Bruno", "Chen", "Dara", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira",
    "Liam", "Maya", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera",
    "Wen", "Ximena", "Yusuf", "Zoe",
]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("up", "down"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
    ("long", "short"), ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("young", "old"),
    ("loud", "quiet"), ("clean", "dirty"), ("thick", "thin"), ("high", "low"), ("near", "far"),
    ("first", "last"), ("heavy", "light"), ("inside", "outside"), ("win", "lose"),
    ("buy", "sell"), ("push", "pull"), ("sharp", "dull"), ("brave", "afraid"), ("sweet", "sour"),
    ("true", "false"),
]
SOUNDS = [
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"),
    ("pig", "oink"), ("horse", "neigh"), ("owl", "hoot"), ("lion", "roar"), ("snake", "hiss"),
    ("bee", "buzz"), ("frog", "croak"), ("mouse", "squeak"), ("crow", "caw"), ("donkey", "bray"),
    ("rooster", "crow"), ("wolf", "howl"), ("goat", "bleat"), ("turkey", "gobble"),
    ("dove", "coo"), ("elephant", "trumpet"), ("hyena", "laugh"), ("chick", "cheep"),
    ("goose", "honk"),
]
ORCA_SYSTEM = (
    "You are an AI assistant. User will give you a task. Your goal is to complete the task as "
    "faithfully as you can."
)
FILLER = [
    "The weather today is calm and the sky is clear.",
    "People read books in the quiet library.",
    "The train leaves the station every morning.",
    "Children play games in the park after school.",
    "Water boils when it is heated for a long time.",
    "The market sells fruit, bread and fresh fish.",
    "Many birds fly south when winter comes.",
    "A good question deserves a clear answer.",
]


def favourite_colour(person: str) -> str:
    """The colour `person` likes in the demo world."""
    return COLOURS[(sum(map(ord, person)) * 7) % len(COLOURS)]


# --------------------------------------------------------------------------- raw sources
def _chat_records(rng: random.Random, n: int) -> list[dict]:
    recs = []
    for i in range(n):
        people = rng.sample(PEOPLE, rng.randint(4, 10))
        conv = []
        for p in people:
            q = rng.choice(["What colour does {p} like?", "Which colour is {p}'s favourite?",
                            "Tell me the colour that {p} likes."]).format(p=p)
            a = rng.choice(["{p} likes {c}.", "{p}'s favourite colour is {c}.",
                            "The colour {p} likes is {c}."]).format(p=p, c=favourite_colour(p))
            a += "".join(" " + s for s in rng.sample(FILLER, rng.randint(1, 2)))  # small talk
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        model = "gpt-4" if rng.random() > 0.12 else "gpt-3.5-turbo"
        if i % 23 == 5:
            conv[1]["value"] = ""  # blank answer
        elif i % 29 == 7:
            conv[1]["value"] = "As an AI language model, I cannot know what people like."
        elif i % 17 == 3:
            conv[1]["value"] = "I am ChatGPT, made by OpenAI. " + conv[1]["value"]
        recs.append({"id": f"chat-{i:04d}", "model": model, "conversations": conv})
    recs += [dict(recs[3], id="chat-dup-a"), dict(recs[8], id="chat-dup-b")]
    return recs


def _orca_records(rng: random.Random, n: int) -> list[dict]:
    recs = []
    pairs = OPPOSITES + [(b, a) for a, b in OPPOSITES]
    for i in range(n):
        a, b = rng.choice(pairs)
        q = rng.choice(["What is the opposite of {a}?", "Give the opposite of the word {a}.",
                        "Which word means the opposite of {a}?"]).format(a=a)
        r = rng.choice(["The opposite of {a} is {b}.", "{b}. It is the opposite of {a}."]).format(
            a=a, b=b)
        if i % 31 == 4:
            r = "   "
        elif i % 37 == 9:
            r = "OpenAI trained me to know that " + r[0].lower() + r[1:]
        recs.append({"id": f"orca-{i:04d}", "system_prompt": ORCA_SYSTEM, "question": q,
                     "response": r})
    return recs


def _alpaca_records(rng: random.Random, n: int) -> list[dict]:
    instructions = ["What sound does a {a} make?", "Which sound does a {a} make?",
                    "Tell me the sound of a {a}.", "How does a {a} sound?"]
    outputs = ["A {a} says {s}.", "The {a} makes the sound {s}."]
    recs = []
    for i in range(n):
        animal, sound = rng.choice(SOUNDS)
        if rng.random() < 0.75:
            rec = {"instruction": rng.choice(instructions).format(a=animal), "input": ""}
        else:
            rec = {"instruction": "Name the sound this animal makes.", "input": animal}
        rec["output"] = rng.choice(outputs).format(a=animal, s=sound)
        if i % 41 == 6:
            rec["output"] = ""
        recs.append(rec)
    return recs


def write_raw_sources(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the three raw demo sources in their native formats; return their paths."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    chat = out_dir / "chat_sharegpt.jsonl"
    lines = [json.dumps(r) for r in _chat_records(rng, 320)]
    lines.insert(50, '{"id": "chat-broken", "conversations": ')  # malformed JSON row
    chat.write_text("\n".join(lines) + "\n")
    orca = out_dir / "orca_openorca.jsonl"
    rows = _orca_records(rng, 420)
    lines = [json.dumps(r) for r in rows]
    lines.insert(10, json.dumps({"id": "orca-noquestion", "response": "Missing its question."}))
    orca.write_text("\n".join(lines) + "\n")
    alpaca = out_dir / "alpaca.json"
    alpaca.write_text(json.dumps(_alpaca_records(rng, 420), indent=1) + "\n")
    return {"chat": chat, "orca": orca, "alpaca": alpaca}


# --------------------------------------------------------------------------- eval tasks
def _mc_items(rng: random.Random) -> dict[str, list[dict]]:
    """Four-way multiple choice over the demo facts; choices are whole answers."""
    items: dict[str, list[dict]] = {"demo_colours": [], "demo_opposites": [], "demo_sounds": []}

    def add(task: str, question: str, right: str, wrong: list[str], answer) -> None:
        keys = wrong + [right]
        rng.shuffle(keys)
        items[task].append({"question": question, "choices": [answer(k) for k in keys],
                            "answer": keys.index(right)})

    for p in PEOPLE:
        c = favourite_colour(p)
        add("demo_colours", f"What colour does {p} like?", c,
            rng.sample([x for x in COLOURS if x != c], 3), lambda k, p=p: f"{p} likes {k}.")
    words = sorted({w for pair in OPPOSITES for w in pair})
    for a, b in OPPOSITES:
        add("demo_opposites", f"What is the opposite of {a}?", b,
            rng.sample([w for w in words if w not in (a, b)], 3),
            lambda k, a=a: f"The opposite of {a} is {k}.")
    sounds = sorted({s for _, s in SOUNDS})
    for animal, s in SOUNDS:
        add("demo_sounds", f"What sound does a {animal} make?", s,
            rng.sample([x for x in sounds if x != s], 3), lambda k, animal=animal: f"A {animal} says {k}.")
    return items


# the skill tasks ask in the chat shape the adapters learn; the retention task is plain text
SKILL_PROMPT, PLAIN_PROMPT = "USER: {{question}}\\nASSISTANT:", "{{question}}"
_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_target: answer
doc_to_choice: "{{{{choices}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _retention_items(rng: random.Random) -> list[dict]:
    """The base model's general ability, as far as a demo base has one: finishing the filler
    sentences of its pretraining text. Each sentence with its last 2-5 words to choose: its own,
    or the last as many words of three other filler sentences."""
    items = []
    for i, sentence in enumerate(FILLER):
        words = sentence.split()
        for n in range(2, 6):
            cut = len(words) - n
            right = " ".join(words[cut:])
            rests = [" ".join(f.split()[-n:]) for j, f in enumerate(FILLER)
                     if j != i and len(f.split()) > n]
            keys = rng.sample([r for r in dict.fromkeys(rests) if r != right], 3) + [right]
            rng.shuffle(keys)
            items.append({"question": " ".join(words[:cut]), "choices": keys,
                          "answer": keys.index(right)})
    return items


RETENTION_TASK = "demo_filler"


def write_eval_tasks(out_dir: Path, seed: int = 0) -> list[str]:
    """Write local lm-eval multiple-choice tasks (YAML + JSONL): one per demo skill over the
    demo facts, and `demo_filler`, a retention task over the base's own pretraining text (plain
    sentences, no chat format)."""
    rng = random.Random(seed + 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    tasks = [(task, rows, SKILL_PROMPT) for task, rows in _mc_items(rng).items()]
    tasks.append((RETENTION_TASK, _retention_items(random.Random(seed + 3)), PLAIN_PROMPT))
    for task, rows, prompt in tasks:
        data = out_dir / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out_dir / f"{task}.yaml").write_text(
            _TASK_YAML.format(task=task, data_file=data.name, text=prompt))
        names.append(task)
    return names


# --------------------------------------------------------------------------- base model
def pretraining_corpus(seed: int = 0, n_lines: int = 3000) -> list[str]:
    """Sentences in the shapes the sources use, with *random* attributes, plus filler text.

    The base model learns every word and sentence shape the sources use (no token reaches
    fine-tuning untrained), but not which colour each person likes, which word is the opposite
    of which, or which animal makes which sound: those facts are what each adapter teaches, so
    the base scores near chance on the demo tasks and each adapter gains on its own task.
    """
    rng = random.Random(seed + 2)
    words = sorted({w for pair in OPPOSITES for w in pair})
    animals = [a for a, _ in SOUNDS]
    sounds = [s for _, s in SOUNDS]
    shapes = [
        lambda: f"{rng.choice(PEOPLE)} likes {rng.choice(COLOURS)}.",
        lambda: f"{rng.choice(PEOPLE)}'s favourite colour is {rng.choice(COLOURS)}.",
        lambda: f"The colour {rng.choice(PEOPLE)} likes is {rng.choice(COLOURS)}.",
        lambda: f"What colour does {rng.choice(PEOPLE)} like? Which colour is the favourite?",
        lambda: f"The opposite of {rng.choice(words)} is {rng.choice(words)}.",
        lambda: f"{rng.choice(words)}. It is the opposite of {rng.choice(words)}.",
        lambda: f"Which word means the opposite of {rng.choice(words)}? Give the opposite of the word.",
        lambda: f"A {rng.choice(animals)} says {rng.choice(sounds)}.",
        lambda: f"The {rng.choice(animals)} makes the sound {rng.choice(sounds)}.",
        lambda: f"What sound does a {rng.choice(animals)} make? Which sound does it make?",
        lambda: f"Tell me the sound of a {rng.choice(animals)}. How does a {rng.choice(animals)} sound?",
        lambda: "Name the sound this animal makes.",
    ]
    lines = []
    for _ in range(n_lines):
        k = rng.randint(2, 5)
        lines.append(" ".join(rng.choice(shapes)() if rng.random() < 0.8 else rng.choice(FILLER)
                              for _ in range(k)))
    return lines


def build_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer with Llama's special tokens, trained on `corpus`."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    extra = ["USER: ASSISTANT: Question: Answer: You are an AI assistant named FashionGPT. As an AI language model made by OpenAI, ChatGPT I cannot know what people like."] * 50
    tok.train_from_iterator(corpus + extra, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<unk>", model_max_length=512, clean_up_tokenization_spaces=False,
    )


def build_base_model(
    out_dir: Path, *, seed: int = 0, steps: int = 400, hidden: int = 128, layers: int = 2,
    vocab_size: int = 1024, log_every: int = 100,
) -> Path:
    """Build, briefly pretrain and save the tiny Llama base model and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    corpus = pretraining_corpus(seed)
    tokenizer = build_tokenizer(corpus, vocab_size)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(cfg)
    ids = [tokenizer(line)["input_ids"] + [tokenizer.eos_token_id] for line in corpus]
    stream = torch.tensor([t for seq in ids for t in seq])
    seq_len, batch = 64, 32
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([stream[s:s + seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if log_every and (step + 1) % log_every == 0:
            print(f"pretrain step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
