"""Preference pairs: the three layouts read into one normal form, bad records named by file and
line, and token examples whose two sides share the prompt and are trained on the answer only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from babyllama.data.preference import (PAIR_FORMATS, PairExample, PairStats, PreferencePair,
                                       build_pairs, iter_pairs)
from babyllama.data.readers import BadRecords
from babyllama.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

QUESTIONS = ["你好", "今天天气怎么样？", "你喜欢什么书？", "讲个笑话吧。"]
ANSWERS = ["你好，很高兴见到你。", "今天天气很好，我们去公园散步。",
           "机器学习和自然语言处理很有意思。", "The quick brown fox jumps over the lazy dog."]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def pair(*turns: str, chosen: str, rejected: str, system: str | None = None) -> PreferencePair:
    roles = ["user", "assistant"]
    return PreferencePair([{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)],
                          chosen, rejected, system, "test:1")


def targets(tok, ex) -> str:
    return tok.decode(ex.ids[ex.mask].tolist(), skip_special_tokens=False)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer, tmp_path_factory):
    """A copy of the tiny tokenizer with the ChatML template set, as a run's tokenizer has."""
    from babyllama.tokenizer import Tokenizer
    from babyllama.tokenizer.chat_template import TEMPLATES

    copy = Tokenizer.load(tiny_tokenizer.save(tmp_path_factory.mktemp("pref-tok")))
    copy.chat_template = TEMPLATES["chatml"]
    return copy


# ---------------------------------------------------------------------------------------------
# Formats


def test_prompt_format_reads_prompt_question_instruction_and_response_fields(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": " 你好 ", "chosen": " 你好！ ", "rejected": "走开", "system": "你是助手"},
        {"question": "1+1=?", "chosen": "2", "rejected": "3"},
        {"prompt": "天气", "response_chosen": "晴", "response_rejected": "不知道"},
        {"instruction": "翻译", "input": "hello", "chosen": "你好", "rejected": "再见",
         "history": [["在吗", "在"]]},
    ])
    pairs = list(iter_pairs(path, system="默认"))
    assert pairs[0] == PreferencePair([user("你好")], "你好！", "走开", "你是助手", f"{path}:1")
    assert pairs[1] == PreferencePair([user("1+1=?")], "2", "3", "默认", f"{path}:2")
    assert (pairs[2].chosen, pairs[2].rejected) == ("晴", "不知道")
    assert pairs[3].messages == [user("在吗"), assistant("在"), user("翻译\nhello")]


def test_sharegpt_format_keeps_history_and_system_and_locates_items_by_line(tmp_path):
    records = [
        {"conversations": [{"from": "system", "value": "你是助手"}, {"from": "human", "value": "你好"}],
         "chosen": {"from": "gpt", "value": "你好！"}, "rejected": {"from": "gpt", "value": "嗯"}},
        {"conversations": [{"from": "human", "value": "在吗"}, {"from": "gpt", "value": "在"},
                           {"from": "human", "value": "讲个笑话"}],
         "chosen": {"from": "gpt", "value": "好的……"}, "rejected": "不讲", "system": "幽默"},
    ]
    path = write_json(tmp_path / "s.json", records)
    first, second = iter_pairs(path)
    assert first == PreferencePair([user("你好")], "你好！", "嗯", "你是助手", f"{path}:2")
    assert second.messages == [user("在吗"), assistant("在"), user("讲个笑话")]
    assert (second.rejected, second.system) == ("不讲", "幽默")
    line = int(second.source.rsplit(":", 1)[1])
    assert path.read_text(encoding="utf-8").splitlines()[line - 1].strip() == "{"
    assert line > 2


def test_openai_format_with_implicit_and_explicit_prompts(tmp_path):
    prefix = [{"role": "system", "content": "你是助手"}, user("在吗"), assistant("在"), user("你好")]
    implicit = {"chosen": prefix + [assistant("你好！")], "rejected": prefix + [assistant("嗯")]}
    explicit = {"prompt": [user("你好")], "chosen": [assistant("你好！")],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "嗯"}]}]}
    path = write_jsonl(tmp_path / "o.jsonl", [implicit, explicit])
    a, b = iter_pairs(path)
    assert a == PreferencePair([user("在吗"), assistant("在"), user("你好")], "你好！", "嗯",
                               "你是助手", f"{path}:1")
    assert b == PreferencePair([user("你好")], "你好！", "嗯", None, f"{path}:2")
    assert a.chosen_messages() == prefix + [assistant("你好！")]
    assert a.rejected_messages() == prefix + [assistant("嗯")]


def test_the_format_is_detected_per_file_of_a_directory_or_forced(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": "你好", "chosen": "你好！", "rejected": "嗯"}])
    write_json(folder / "b.json", [{"conversations": [{"from": "human", "value": "你好"}],
                                    "chosen": {"from": "gpt", "value": "你好！"},
                                    "rejected": {"from": "gpt", "value": "嗯"}}])
    write_jsonl(folder / "c.jsonl", [{"chosen": [user("你好"), assistant("你好！")],
                                      "rejected": [user("你好"), assistant("嗯")]}])
    pairs = list(iter_pairs(folder))
    assert [(p.messages, p.chosen, p.rejected) for p in pairs] == [([user("你好")], "你好！", "嗯")] * 3
    assert [Path(p.source.rsplit(":", 1)[0]).name for p in pairs] == ["a.jsonl", "b.json", "c.jsonl"]
    with pytest.raises(UserError, match=r"b\.json:2: no 'prompt' or 'question' or 'instruction'"):
        list(iter_pairs(folder, format="prompt"))
    assert PAIR_FORMATS == ("prompt", "sharegpt", "openai")


def test_splits_of_a_json_object_are_read_and_one_is_picked_with_a_hash(tmp_path):
    one = {"prompt": "你好", "chosen": "你好！", "rejected": "嗯"}
    path = write_json(tmp_path / "splits.json", {"train": [one, one], "test": [dict(one, prompt="再见")]})
    assert [p.messages[0]["content"] for p in iter_pairs(path)] == ["你好", "你好", "再见"]
    (test,) = iter_pairs(f"{path}#test")
    line = int(test.source.rsplit(":", 1)[1])
    assert test.messages == [user("再见")]
    assert path.read_text(encoding="utf-8").splitlines()[line] == '      "prompt": "再见",'  # next line
    with pytest.raises(UserError, match=r"splits\.json#dev: no key 'dev' \(keys: train, test\)"):
        list(iter_pairs(f"{path}#dev"))


def test_gzip_files_and_json_lines_under_a_json_name_are_read(tmp_path):
    import gzip

    one = json.dumps({"prompt": "你好", "chosen": "你好！", "rejected": "嗯"}, ensure_ascii=False)
    with gzip.open(tmp_path / "p.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(one + "\n" + one + "\n")
    (tmp_path / "lines.json").write_text(one + "\n" + one + "\n", encoding="utf-8")
    assert [p.source for p in iter_pairs(tmp_path / "p.jsonl.gz")] == \
        [f"{tmp_path / 'p.jsonl.gz'}:{n}" for n in (1, 2)]
    assert [p.source for p in iter_pairs(tmp_path / "lines.json")] == \
        [f"{tmp_path / 'lines.json'}:{n}" for n in (1, 2)]


def test_the_real_dpo_zh_demo_gives_300_pairs(tok):
    path = SHARED / "preference" / "dpo_zh_demo.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    pairs = list(iter_pairs(path))
    assert len(pairs) == 300
    # Its 64 records of two messages are a system prompt and a user turn (not earlier exchanges).
    assert sum(p.system is not None for p in pairs) == 64
    assert all(len(p.messages) == 1 and p.messages[0]["role"] == "user" for p in pairs)
    assert all(p.chosen and p.rejected and p.chosen != p.rejected for p in pairs)
    assert pairs[0].source == f"{path}:2"
    examples, stats = build_pairs(pairs[:20], tok, 100_000)  # all fit
    assert stats.examples == len(examples) == 20
    for p, ex in zip(pairs, examples):
        assert targets(tok, ex.chosen) == p.chosen + "<|im_end|>"
        assert targets(tok, ex.rejected) == p.rejected + "<|im_end|>"
        assert np.array_equal(ex.chosen.ids[:ex.prompt_len], ex.rejected.ids[:ex.prompt_len])


# ---------------------------------------------------------------------------------------------
# Bad input

GOOD = {
    "prompt": {"prompt": "你好", "chosen": "你好！", "rejected": "嗯"},
    "sharegpt": {"conversations": [{"from": "human", "value": "你好"}],
                 "chosen": {"from": "gpt", "value": "你好！"}, "rejected": {"from": "gpt", "value": "嗯"}},
    "openai": {"chosen": [user("你好"), assistant("你好！")], "rejected": [user("你好"), assistant("嗯")]},
}
BAD = [  # (format of the file, bad record on line 2, problem)
    ("prompt", {"prompt": "你好", "chosen": "你好！"}, "no 'rejected' or 'response_rejected' field"),
    ("prompt", {"prompt": "你好", "chosen": 3, "rejected": "嗯"}, "'chosen' is a number, not a string"),
    ("prompt", {"prompt": "你好", "chosen": " 嗯 ", "rejected": "嗯"}, "are the same answer"),
    ("prompt", {"prompt": "你好", "chosen": "  ", "rejected": "嗯"}, "'chosen' is empty"),
    ("prompt", {"prompt": "你好", "chosen": "好", "rejected": ""}, "'rejected' is empty"),
    ("prompt", "[1, 2]", "expected an object, found a list"),
    ("prompt", '{"prompt": "你好", "chosen": ', "invalid JSON"),
    ("sharegpt", dict(GOOD["sharegpt"], conversations=[{"from": "robot", "value": "你好"}]),
     "message 1 of 'conversations' has unknown role 'robot'"),
    ("sharegpt", dict(GOOD["sharegpt"], conversations=[{"from": "human", "value": "你好"},
                                                       {"from": "gpt", "value": "你好！"}]),
     "'conversations' ends with an assistant turn"),
    ("sharegpt", dict(GOOD["sharegpt"], conversations=[]), "no user turn in 'conversations'"),
    ("sharegpt", dict(GOOD["sharegpt"], chosen={"from": "human", "value": "你好！"}),
     "'chosen' is from 'human', not the assistant"),
    ("openai", {"chosen": [user("你好"), assistant("好")], "rejected": [user("您好"), assistant("嗯")]},
     "'chosen' and 'rejected' differ before their last message"),
    ("openai", {"chosen": [user("你好"), assistant("好")], "rejected": [user("你好")]},
     "differ before their last message"),
    ("openai", {"chosen": [user("你好"), user("好")], "rejected": [user("你好"), assistant("嗯")]},
     "'chosen' does not end with an assistant message"),
    ("openai", {"prompt": [user("你好")], "chosen": [assistant("好"), assistant("好")],
                "rejected": [assistant("嗯")]}, "'chosen' holds 2 messages"),
    ("openai", {"chosen": [{"role": "user"}, assistant("好")], "rejected": [user("你好"), assistant("嗯")]},
     "message 1 of 'chosen' has no 'content'"),
]


@pytest.mark.parametrize("fmt,record,problem", BAD, ids=[problem for _, _, problem in BAD])
def test_a_bad_record_is_one_error_naming_file_and_line(tmp_path, fmt, record, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[fmt], record, GOOD[fmt]])
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}:2: .*{re.escape(problem)}"):
        list(iter_pairs(path))


def test_a_bad_item_of_a_json_list_is_named_by_its_line(tmp_path):
    path = write_json(tmp_path / "bad.json", [GOOD["prompt"], {"prompt": "你好", "chosen": "嗯",
                                                                "rejected": "嗯"}])
    with pytest.raises(UserError, match=r"bad\.json:7: 'chosen' and 'rejected' are the same"):
        list(iter_pairs(path))


def test_a_malformed_first_record_does_not_hide_the_format(tmp_path):
    path = write_jsonl(tmp_path / "first.jsonl", ["[1, 2]", GOOD["sharegpt"]])
    with pytest.raises(UserError, match=r"first\.jsonl:1: expected an object, found a list"):
        list(iter_pairs(path))
    (only,) = iter_pairs(path, skip_bad=True)
    assert only.source == f"{path}:2"


def test_skip_bad_skips_and_counts_bad_records_by_reason(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        GOOD["prompt"], {"prompt": "你好", "chosen": "嗯", "rejected": "嗯 "}, "{not json",
        GOOD["prompt"], {"prompt": "你好", "chosen": "", "rejected": "嗯"},
        {"prompt": "再见", "chosen": "嗯", "rejected": "嗯"}])
    bad = BadRecords()
    pairs = list(iter_pairs(path, skip_bad=True, bad=bad))
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:4"]
    assert bad.count == 4
    assert bad.locations == [f"{path}:{n}" for n in (2, 3, 5, 6)]
    assert bad.reasons["invalid JSON"] == 1
    assert sum(n for reason, n in bad.reasons.items() if "same answer" in reason) == 2
    assert "4 bad records skipped" in bad.summary()


def test_empty_undetectable_and_unknown_format_files_are_refused(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(UserError, match=r"empty\.jsonl: no records"):
        list(iter_pairs(empty))
    for name, value in (("empty.json", []), ("empty-object.json", {})):
        with pytest.raises(UserError, match=rf"{re.escape(name)}: no records"):
            list(iter_pairs(write_json(tmp_path / name, value)))
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "你好", "label": 1}])
    with pytest.raises(UserError, match=r"odd\.jsonl: cannot tell the preference format "
                                        r"\(first record's fields: text, label\)"):
        list(iter_pairs(odd))
    with pytest.raises(UserError, match=r"unknown preference format 'dpo' \(choose from: prompt, "
                                        r"sharegpt, openai\)"):
        list(iter_pairs(odd, format="dpo"))
    with pytest.raises(UserError, match=r"missing\.jsonl: no such file"):
        list(iter_pairs(tmp_path / "missing.jsonl"))
    (tmp_path / "broken.json").write_text('[{"prompt": "你好",\n ]', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken\.json:2: invalid JSON"):
        list(iter_pairs(tmp_path / "broken.json"))


# ---------------------------------------------------------------------------------------------
# Token examples


@pytest.mark.parametrize("template", ["chatml", "babyllama"])
def test_only_the_final_answer_and_its_end_token_are_targets(tok, template):
    from babyllama.tokenizer.chat_template import TEMPLATES

    end = "<|im_end|>" if template == "chatml" else tok.special_tokens["eos"]
    p = pair(QUESTIONS[0], ANSWERS[0], QUESTIONS[1], chosen=ANSWERS[1], rejected=ANSWERS[2],
             system="你是助手")
    (ex,), stats = build_pairs([p], tok, 1000, template=TEMPLATES[template])
    assert isinstance(ex, PairExample) and ex.source == "test:1"
    assert targets(tok, ex.chosen) == ANSWERS[1] + end  # the earlier answer is context only
    assert targets(tok, ex.rejected) == ANSWERS[2] + end
    for side in (ex.chosen, ex.rejected):
        assert side.ids.dtype == np.int32 and side.mask.dtype == bool and not side.mask[0]
        start = int(np.argmax(side.mask))
        assert side.mask[start:].sum() == side.mask.sum()  # one contiguous block at the end
    start = ex.prompt_len
    assert start == int(np.argmax(ex.rejected.mask))
    assert np.array_equal(ex.chosen.ids[:start], ex.rejected.ids[:start])
    assert ex.chosen.ids[start] != ex.rejected.ids[start]
    assert (stats.pairs, stats.examples, stats.truncated, stats.dropped) == (1, 1, 0, 0)


def test_the_run_template_is_the_tokenizer_chat_template(tok):
    p = pair(QUESTIONS[0], chosen=ANSWERS[0], rejected=ANSWERS[1])
    (ex,), _ = build_pairs([p], tok, 1000)
    text = tok.decode(ex.chosen.ids.tolist(), skip_special_tokens=False)
    assert text.startswith(f"<|im_start|>user\n{QUESTIONS[0]}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("longer", ["chosen", "rejected"])
def test_long_pairs_lose_the_same_oldest_turns_on_both_sides(tok, longer):
    short, long = ANSWERS[0], ANSWERS[2] * 2
    chosen, rejected = (long, short) if longer == "chosen" else (short, long)
    turns = [t for q, a in zip(QUESTIONS[:3], ANSWERS[:3]) for t in (q, a)] + [QUESTIONS[3]]
    full = pair(*turns, chosen=chosen, rejected=rejected, system="你是助手")
    last_two = pair(*turns[4:], chosen=chosen, rejected=rejected, system="你是助手")
    (whole,), _ = build_pairs([full], tok, 10_000)
    (two,), _ = build_pairs([last_two], tok, 10_000)
    max_len = max(len(two.chosen.ids), len(two.rejected.ids)) + 3  # room for 1 of 3 exchanges
    examples, stats = build_pairs([full], tok, max_len)
    (ex,) = examples
    assert np.array_equal(ex.chosen.ids, two.chosen.ids)  # the shorter side lost them too
    assert np.array_equal(ex.rejected.ids, two.rejected.ids)
    assert len(ex.chosen.ids) < len(whole.chosen.ids)
    assert max(len(ex.chosen.ids), len(ex.rejected.ids)) <= max_len
    text = tok.decode(ex.chosen.ids.tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n你是助手") and QUESTIONS[1] not in text
    assert QUESTIONS[2] in text
    assert targets(tok, ex.chosen) == chosen + "<|im_end|>"
    assert (stats.pairs, stats.examples, stats.truncated, stats.turns_dropped) == (1, 1, 1, 4)
    assert "1 truncated (4 older turns removed)" in stats.summary()


def test_a_pair_whose_answer_cannot_fit_is_dropped_and_counted_never_cut(tok):
    fits = pair(QUESTIONS[1], chosen=ANSWERS[1], rejected=ANSWERS[0])
    long_rejected = pair(QUESTIONS[0], ANSWERS[0], QUESTIONS[1], chosen=ANSWERS[1],
                         rejected=ANSWERS[2] * 5)
    long_chosen = pair(QUESTIONS[2], chosen=ANSWERS[3] * 5, rejected=ANSWERS[0])
    examples, stats = build_pairs([long_rejected, fits, long_chosen], tok, 60)
    (ex,) = examples
    assert targets(tok, ex.chosen) == ANSWERS[1] + "<|im_end|>"
    assert (stats.pairs, stats.examples, stats.dropped) == (3, 1, 2)
    assert stats.reasons == {"last exchange longer than 60 tokens": 2}
    assert isinstance(stats, PairStats)
    assert stats.summary() == "3 pairs -> 1 examples; 2 dropped (2 last exchange longer than 60 tokens)"


def test_chosen_equal_to_rejected_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "你好", "chosen": "你好！\n",
                                                  "rejected": " 你好！"}])
    with pytest.raises(UserError, match=r"same\.jsonl:1: 'chosen' and 'rejected' are the same answer"):
        list(iter_pairs(path))
    assert list(iter_pairs(path, skip_bad=True)) == []


def test_a_template_that_renders_the_prompt_from_the_answer_is_refused(tok):
    peeking = ("{%- for m in messages -%}{%- if m.role == 'user' -%}"
               "{{- 'Q: ' + m.content + ' (' + (messages[-1].content | length | string) + ')\\n' -}}"
               "{%- else -%}{{- 'A: ' -}}{%- generation -%}{{- m.content + eos_token -}}"
               "{%- endgeneration -%}{%- endif -%}{%- endfor -%}")
    p = pair(QUESTIONS[0], chosen=ANSWERS[0], rejected=ANSWERS[1])
    with pytest.raises(UserError, match=r"test:1: the chat template renders the prompt differently"):
        build_pairs([p], tok, 1000, template=peeking)
