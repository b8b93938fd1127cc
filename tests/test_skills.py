"""Per-skill tasks: a held-out test split per dataset, scored as the per-token probability of
its reference answers, grouped beside the other tasks in the table."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fashionfuse.cli import app
from fashionfuse.config import ConfigError, load_config
from fashionfuse.evaluate.presets import TaskSpec
from fashionfuse.evaluate.skills import continuation_tokens, split_last_turn
from fashionfuse.evaluate.table import build_table
from fashionfuse.rundir import content_digest

def _skill_config(make_config, **eval_updates):
    """The test config with a 20 % test split per dataset and skill tasks on."""
    path = make_config(eval={"skill_tasks": True, "tasks": ["demo_colours"], **eval_updates})
    data = yaml.safe_load(path.read_text())
    for ds in data["datasets"]:
        ds["test_fraction"] = 0.2
    path.write_text(yaml.safe_dump(data))
    return path


def test_test_split_is_held_out_from_training_and_validation(make_config, tmp_path):
    cfg = _skill_config(make_config)
    res = CliRunner().invoke(app, ["curate", str(cfg)])
    assert res.exit_code == 0, res.output
    for name in ("chat", "orca"):
        folder = tmp_path / "run" / "curate" / name
        split = {s: [json.loads(x) for x in (folder / f"{s}.jsonl").read_text().splitlines()]
                 for s in ("train", "validation", "test")}
        stats = json.loads((folder / "stats.json").read_text())
        total = sum(len(v) for v in split.values())
        assert stats["test"] == len(split["test"]) and total == stats["instances"]

        def chats(recs):  # segments of one chat carry their parent's id
            return {r.get("meta", {}).get("parent", r["id"]) for r in recs}

        every = [r for v in split.values() for r in v]
        largest = max(sum(1 for r in every if chats([r]) == {c}) for c in chats(every))
        assert 0 < len(split["test"]) and abs(len(split["test"]) - 0.2 * total) <= largest
        assert 0 < len(split["validation"]) and abs(len(split["validation"]) - 0.1 * total) <= largest

        assert not chats(split["test"]) & (chats(split["train"]) | chats(split["validation"]))
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["content_hash"] == content_digest(
            folder, ["train.jsonl", "validation.jsonl", "test.jsonl"])


def test_skill_tasks_need_a_test_split(make_config):
    with pytest.raises(ConfigError, match="eval.skill_tasks"):
        load_config(make_config(eval={"skill_tasks": True}))


@pytest.mark.parametrize("template", ["table9", "model"])
def test_last_turn_split_is_the_trained_text(tiny_model, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    if template == "model":
        tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "colour of grass?"}, {"role": "assistant", "content": "green"}]
    context, target = split_last_turn(msgs, "be brief", tok, template)
    assert "hello there" in context and "green" not in context
    assert target.lstrip().startswith("green") and target.rstrip().endswith("</s>")
    assert context == context.rstrip()  # trailing whitespace moved, as lm-eval does
    assert continuation_tokens(tok, context, target) >= 2


def test_skill_scores_are_answer_token_probabilities(make_config, tiny_model, tmp_path):
    """Through the CLI: the skill columns equal exp(mean log-prob of the answer tokens) per
    test record, computed here with a plain forward of the same model; groups and average."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _skill_config(make_config, load_in_4bit=False, models=["base"])
    runner = CliRunner()
    for stage in ("curate", "eval"):
        res = runner.invoke(app, [stage, str(cfg), "--set", "model.quantization.compute_dtype=float32"])
        assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "run" / "eval" / "table.json").read_text())
    assert table["columns"] == ["skill_chat", "skill_orca", "demo_colours", "skill", "other",
                                "average"]
    row = table["rows"][0]
    assert row["skill"] == pytest.approx((row["skill_chat"] + row["skill_orca"]) / 2, abs=0.01)
    assert row["average"] == pytest.approx((row["skill"] + row["other"]) / 2, abs=0.01)

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    docs = [json.loads(x) for x in
            (tmp_path / "run" / "eval_tasks" / "skills" / "orca.jsonl").read_text().splitlines()]
    probs = []
    for doc in docs[:6]:  # eval.limit: lm-eval scores the first documents
        ctx = tok(doc["context"], add_special_tokens=False)["input_ids"]
        whole = tok(doc["context"] + doc["target"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits.log_softmax(-1)[0]
        ll = sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
        assert doc["target_tokens"] == len(whole) - len(ctx)
        probs.append(math.exp(ll / doc["target_tokens"]))
    assert row["skill_orca"] == pytest.approx(100 * sum(probs) / len(probs), abs=0.011)


def test_table_groups_only_when_there_are_two():
    res = {"m": {"results": {"a": {"acc,none": 0.5}, "b": {"acc,none": 1.0},
                             "c": {"acc,none": 0.0}}}}
    one = [TaskSpec("a", 0, "acc,none", "a", "retention"), TaskSpec("b", 0, "acc,none", "b", "retention")]
    table = build_table(res, one)
    assert table["columns"] == ["a", "b", "average"] and table["rows"][0]["average"] == 75.0
    two = [*one, TaskSpec("c", 0, "acc,none", "c", "skill")]
    row = build_table(res, two)["rows"][0]
    assert (row["retention"], row["skill"], row["average"]) == (75.0, 0.0, 37.5)
