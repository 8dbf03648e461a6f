"""SFT conversation readers (babyllama.data.conversations) and recipes (data.sft_augment)."""

from __future__ import annotations

import gzip
import json
import random
import re
import time

import pytest
from conftest import SHARED_DATA

from babyllama.data.conversations import (FORMATS, Conversation, detect_format,
                                          iter_conversations, unsplit_characters)
from babyllama.data.readers import BadRecords
from babyllama.data.sft_augment import (SUMMARY_ANSWERS, SUMMARY_QUESTIONS, augment_constraints,
                                        shuffle_constraints, summary_messages)
from babyllama.errors import UserError

SFT = SHARED_DATA / "sft"
CSL = SHARED_DATA / "summarization" / "csl" / "ts_dev.tsv"


def jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def convs(source, **kwargs) -> list[Conversation]:
    return list(iter_conversations(str(source), **kwargs))


def pairs(conv: Conversation) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in conv.messages]


def need(path):
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


# ---------------------------------------------------------------------------------------------
# One reader per format, on small synthetic files

def test_openai_leading_system_message_becomes_system(tmp_path):
    path = jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "你是助手。"},
                      {"role": "user", "content": "你好"},
                      {"role": "assistant", "content": "你好！有什么可以帮你？"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "一加一"},
                                                   {"type": "text", "text": "等于几？"}]},
                      {"role": "assistant", "content": "二"}]},
    ])
    a, b = convs(path)
    assert a.system == "你是助手。"
    assert pairs(a) == [("user", "你好"), ("assistant", "你好！有什么可以帮你？")]
    assert a.template_messages()[0] == {"role": "system", "content": "你是助手。"}
    assert a.source == f"{path}:1"
    assert pairs(b) == [("user", "一加一等于几？"), ("assistant", "二")]
    assert b.system is None and b.template_messages() == b.messages


def test_sharegpt_accepts_from_value_and_role_content(tmp_path):
    path = tmp_path / "share.json"
    path.write_text(json.dumps([
        {"system": "简洁回答。", "conversations": [
            {"from": "human", "value": "中国的首都？"}, {"from": "gpt", "value": "北京。"},
            {"from": "user", "value": "人口呢？"}, {"from": "chatgpt", "value": "约两千万。"}]},
        {"conversations": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}]},
    ], ensure_ascii=False), encoding="utf-8")
    a, b = convs(path)
    assert a.system == "简洁回答。"
    assert pairs(a) == [("user", "中国的首都？"), ("assistant", "北京。"),
                        ("user", "人口呢？"), ("assistant", "约两千万。")]
    assert a.source == f"{path}:record 1"
    assert pairs(b) == [("user", "hi"), ("assistant", "hello")]


def test_alpaca_joins_instruction_and_input_and_prepends_history(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "翻译成英文。", "input": "你好", "output": "Hello"},
        {"instruction": "写一首诗。", "input": "", "output": "春眠不觉晓"},
        {"instruction": "再来一句", "input": "", "output": "处处闻啼鸟", "system": "你是诗人。",
         "history": [["写一首诗。", "春眠不觉晓"]]},
    ], ensure_ascii=False), encoding="utf-8")
    a, b, c = convs(path)
    assert pairs(a) == [("user", "翻译成英文。\n你好"), ("assistant", "Hello")]
    assert pairs(b) == [("user", "写一首诗。"), ("assistant", "春眠不觉晓")]
    assert c.system == "你是诗人。"
    assert pairs(c) == [("user", "写一首诗。"), ("assistant", "春眠不觉晓"),
                        ("user", "再来一句"), ("assistant", "处处闻啼鸟")]


def test_alpaca_belle_multiturn_instruction_is_split_into_turns(tmp_path):
    path = jsonl(tmp_path / "belle.jsonl", [
        {"instruction": "Human:你好\nAssistant:你好，请问有什么事？\nHuman:讲个笑话\nAssistant:",
         "input": "", "output": "从前有座山。"}])
    (conv,) = convs(path)
    assert pairs(conv) == [("user", "你好"), ("assistant", "你好，请问有什么事？"),
                           ("user", "讲个笑话"), ("assistant", "从前有座山。")]


def test_firefly_turns_and_system(tmp_path):
    path = jsonl(tmp_path / "firefly.jsonl", [
        {"conversation_id": 1, "system": "你是Firefly。",
         "conversation": [{"human": "你好", "assistant": "你好！"},
                          {"human": "你是谁？", "assistant": "我是Firefly。"}]}])
    (conv,) = convs(path)
    assert conv.system == "你是Firefly。"
    assert pairs(conv) == [("user", "你好"), ("assistant", "你好！"),
                           ("user", "你是谁？"), ("assistant", "我是Firefly。")]


def test_kdconv_knowledge_becomes_document_and_unanswered_last_utterance_is_dropped(tmp_path):
    passage = "《英雄》是张艺谋执导的武侠电影。"
    path = tmp_path / "kd.json"
    path.write_text(json.dumps([{"name": "英雄", "messages": [
        {"message": "看过英雄吗？"},
        {"message": "看过，是张艺谋导演的。", "attrs": [
            {"attrname": "Information", "attrvalue": passage, "name": "英雄"},
            {"attrname": "导演", "attrvalue": "张艺谋", "name": "英雄"}]},
        {"message": "哪年上映的？"},
        {"message": "2002年。", "attrs": [
            {"attrname": "Information", "attrvalue": passage, "name": "英雄"},
            {"attrname": "上映时间", "attrvalue": "2002年", "name": "英雄"}]},
        {"message": "谢谢！"},
    ]}], ensure_ascii=False), encoding="utf-8")
    (conv,) = convs(path)
    assert pairs(conv) == [("user", "看过英雄吗？"), ("assistant", "看过，是张艺谋导演的。"),
                           ("user", "哪年上映的？"), ("assistant", "2002年。")]
    # Unique knowledge in order of appearance; triples keep their entity and attribute.
    assert conv.document == f"{passage}\n英雄的导演：张艺谋\n英雄的上映时间：2002年"


REDGPT_TEXT = ("资料：长城是中国古代的军事防御工程。\n\n人类：长城是做什么用的？\n\n"
               "助手：用于军事防御。\n\n主要有两点：\n1. 抵御\n2. 瞭望\n\n人类：谢谢\n\n助手：不客气。")


def test_babyllama_text_in_jsonl_text_field(tmp_path):
    path = jsonl(tmp_path / "seed0.jsonl", [{"text": REDGPT_TEXT}])
    (conv,) = convs(path)
    assert conv.document == "长城是中国古代的军事防御工程。"
    # Blank lines inside an answer stay in it: turns are split at speaker labels, not "\n\n".
    assert pairs(conv) == [("user", "长城是做什么用的？"),
                           ("assistant", "用于军事防御。\n\n主要有两点：\n1. 抵御\n2. 瞭望"),
                           ("user", "谢谢"), ("assistant", "不客气。")]


def test_babyllama_text_reads_redgpt_reference_and_dialogue_in_json_lines(tmp_path):
    # RedGPT-Dataset-V1-CN ships JSON lines under a .json name, labels in English.
    path = tmp_path / "RedGPT-Dataset-V1-CN.json"
    jsonl(path, [{"reference": "黄河是中国第二长河。",
                  "dialogue": "Human：黄河有多长？\n\nAssistant：约5464公里。\n\nHuman(用户): 流经几个省？"
                              "\n\nAssistant: 九个省区。"}] * 2)
    a, b = convs(path)
    assert a.document == "黄河是中国第二长河。"
    assert pairs(a) == [("user", "黄河有多长？"), ("assistant", "约5464公里。"),
                        ("user", "流经几个省？"), ("assistant", "九个省区。")]
    assert b.source == f"{path}:2"


def test_babyllama_text_txt_starts_a_conversation_at_each_ziliao_line(tmp_path):
    path = tmp_path / "seed0.txt"
    path.write_text(REDGPT_TEXT + "\n\n" + REDGPT_TEXT.replace("长城", "运河") + "\n",
                    encoding="utf-8")
    a, b = convs(path)
    assert len(a.messages) == 4 and b.document == "运河是中国古代的军事防御工程。"
    assert a.source == f"{path}:1" and b.source == f"{path}:{REDGPT_TEXT.count(chr(10)) + 3}"


def test_llama2_text_txt_and_csv(tmp_path):
    one = "<s>Human: 你好\n</s><s>Assistant: 你好！\n</s><s>Human: 再见\n</s><s>Assistant: 再见！\n</s>"
    two = "<s>Human: 1+1=?</s><s>Assistant: 2</s>"
    txt = tmp_path / "llama2.txt"
    txt.write_text(one + "\n" + two + "\n", encoding="utf-8")
    a, b = convs(txt)
    assert pairs(a) == [("user", "你好"), ("assistant", "你好！"), ("user", "再见"),
                        ("assistant", "再见！")]
    assert pairs(b) == [("user", "1+1=?"), ("assistant", "2")]
    assert b.source == f"{txt}:6"
    csv_path = tmp_path / "llama2.csv"
    csv_path.write_text('text\n"' + one + '"\n"' + two + '"\n', encoding="utf-8")
    assert [pairs(c) for c in convs(csv_path)] == [pairs(a), pairs(b)]


def test_prompt_answer_csv_any_header_case(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('Question,ANSWER\n"什么是AI？","人工智能，\n即机器的智能。"\n1+1,2\n',
                    encoding="utf-8")
    a, b = convs(path)
    assert pairs(a) == [("user", "什么是AI？"), ("assistant", "人工智能，\n即机器的智能。")]
    assert b.source == f"{path}:4"  # the first row spans lines 2-3


def test_csl_tsv_becomes_summarization_dialogue(tmp_path):
    path = tmp_path / "csl.tsv"
    path.write_text("to title\t本文提出了一种新的\"稀疏\"注意力方法，显著降低了计算量。\t稀疏注意力方法\n",
                    encoding="utf-8")
    (conv,) = convs(path)
    (user, q), (assistant, a) = pairs(conv)
    assert "本文提出了一种新的\"稀疏\"注意力方法" in q and "稀疏注意力方法" in a
    assert conv.messages == summary_messages("本文提出了一种新的\"稀疏\"注意力方法，显著降低了计算量。",
                                             "稀疏注意力方法", seed=0)


def test_lcsts_summary_text_and_title_content(tmp_path):
    path = jsonl(tmp_path / "lcsts.jsonl", [{"summary": "股市大涨", "text": "今天沪指上涨百分之三。"},
                                            {"title": "油价下调", "content": "国内油价今日下调。"}])
    a, b = convs(path)
    assert "今天沪指上涨百分之三。" in a.messages[0]["content"]
    assert "股市大涨" in a.messages[1]["content"]
    assert "油价下调" in b.messages[1]["content"]


def test_dialogues_json_list_dict_splits_and_tab_lines(tmp_path):
    path = tmp_path / "dialogues.json"
    path.write_text(json.dumps({"train": [["你好", "你好呀", "吃了吗"], ["在吗", "在"]],
                                "test": [["早", "早上好"]]}, ensure_ascii=False),
                    encoding="utf-8")
    everything = convs(path)
    assert [pairs(c) for c in everything] == [
        [("user", "你好"), ("assistant", "你好呀")],  # the unanswered 吃了吗 is dropped
        [("user", "在吗"), ("assistant", "在")], [("user", "早"), ("assistant", "早上好")]]
    test = convs(f"{path}#test")
    assert [pairs(c) for c in test] == [[("user", "早"), ("assistant", "早上好")]]
    assert test[0].source == f"{path}:test record 1"
    with pytest.raises(UserError, match=r"no key 'dev' \(keys: train, test\)"):
        convs(f"{path}#dev")
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("今天好热\t是啊，开空调吧\n下雨了\t带伞\t好的\t不客气\n", encoding="utf-8")
    assert [len(c.messages) for c in convs(tsv)] == [2, 4]


def test_lccc_character_spaces_removed_latin_words_kept():
    assert unsplit_characters("我 也 是 ， 常 联 系 啊 ， C F 你 懂 的") == "我也是，常联系啊，CF你懂的"
    assert unsplit_characters("2 4 岁 的 我") == "24岁的我"
    assert unsplit_characters("听 hello world 吧") == "听hello world吧"


def test_lccc_is_detected_from_character_split_text(tmp_path):
    path = tmp_path / "lccc.json"
    path.write_text(json.dumps([["你 好 啊 朋 友", "你 好 ， 好 久 不 见"]] * 3, ensure_ascii=False),
                    encoding="utf-8")
    assert detect_format(path) == "lccc"
    assert pairs(convs(path)[0]) == [("user", "你好啊朋友"), ("assistant", "你好，好久不见")]
    # Named `dialogues`, the spaces stay.
    assert convs(path, format="dialogues")[0].messages[0]["content"] == "你 好 啊 朋 友"


def test_chatterbot_yaml_keeps_scalars_as_text_and_drops_unanswered_last(tmp_path):
    path = tmp_path / "corpus.yml"
    path.write_text("categories:\n- test\nconversations:\n- - 你好\n  - 你好！\n"
                    "- - 你几岁了?\n  - 1984\n  - 真的吗\n- - yes\n  - 'no'\n", encoding="utf-8")
    a, b, c = convs(path)
    assert pairs(a) == [("user", "你好"), ("assistant", "你好！")]
    assert pairs(b) == [("user", "你几岁了?"), ("assistant", "1984")]
    assert pairs(c) == [("user", "yes"), ("assistant", "no")]
    assert b.source == f"{path}:6"


def test_builtin_chatterbot_zh_has_many_conversations():
    pytest.importorskip("chatterbot_corpus")
    conversations = convs("builtin:chatterbot-zh")
    assert detect_format("builtin:chatterbot-zh") == "chatterbot"
    assert len(conversations) > 100
    assert all(c.messages[-1]["role"] == "assistant" for c in conversations)
    assert any("你好" in c.messages[0]["content"] for c in conversations)


def test_unknown_builtin_names_the_available_ones():
    with pytest.raises(UserError, match="available: builtin:chatterbot-zh"):
        convs("builtin:nope")


def test_gzip_and_directory_sources(tmp_path):
    records = [{"instruction": "问", "input": "", "output": "答"}]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(records[0], ensure_ascii=False) + "\n")
    jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "u"},
                                               {"role": "assistant", "content": "a"}]}])
    (tmp_path / "README.md").write_text("not data", encoding="utf-8")
    assert [pairs(c) for c in convs(tmp_path)] == [[("user", "问"), ("assistant", "答")],
                                                   [("user", "u"), ("assistant", "a")]]


def test_default_system_applies_only_to_conversations_without_one(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "自己的"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}])
    assert [c.system for c in convs(path, system="默认")] == ["自己的", "默认"]


def test_consecutive_messages_of_one_role_are_merged_with_newline(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": "第一句"}, {"role": "user", "content": "第二句"},
        {"role": "assistant", "content": "好"}, {"role": "assistant", "content": "明白"}]}])
    assert pairs(convs(path)[0]) == [("user", "第一句\n第二句"), ("assistant", "好\n明白")]


# ---------------------------------------------------------------------------------------------
# Detection

@pytest.mark.parametrize("name, content, expected", [
    ("a.jsonl", {"messages": [{"role": "user", "content": "x"}]}, "openai"),
    ("a.jsonl", {"conversations": [{"from": "human", "value": "x"}]}, "sharegpt"),
    ("a.jsonl", {"instruction": "x", "input": "", "output": "y"}, "alpaca"),
    ("a.jsonl", {"conversation": [{"human": "x", "assistant": "y"}]}, "firefly"),
    ("a.jsonl", {"name": "n", "messages": [{"message": "x"}]}, "kdconv"),
    ("a.jsonl", {"text": "资料：x\n\n人类：y\n\n助手：z"}, "babyllama-text"),
    ("a.jsonl", {"reference": "x", "dialogue": "Human: y\n\nAssistant: z"}, "babyllama-text"),
    ("a.jsonl", {"text": "<s>Human: x\n</s><s>Assistant: y\n</s>"}, "llama2-text"),
    ("a.jsonl", {"prompt": "x", "answer": "y"}, "prompt-answer"),
    ("a.jsonl", {"summary": "x", "text": "y"}, "lcsts"),
    ("a.jsonl", {"title": "x", "content": "y"}, "lcsts"),
    ("a.jsonl", ["你好", "你好呀"], "dialogues"),
    ("a.csv", "q,a\nx,y\n", "prompt-answer"),
    ("a.csv", "input,output\nx,y\n", "prompt-answer"),
    ("a.tsv", "to title\t一段很长很长的摘要文字\t标题\n", "csl"),
    ("a.txt", "<s>Human: x</s><s>Assistant: y</s>\n", "llama2-text"),
    ("a.txt", "资料：x\n\n人类：y\n\n助手：z\n", "babyllama-text"),
    ("a.txt", "你好\t你好呀\n", "dialogues"),
    ("a.yml", "conversations:\n- - x\n  - y\n", "chatterbot"),
])
def test_detect_format_from_extension_and_first_record(tmp_path, name, content, expected):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        jsonl(path, [content])
    assert detect_format(path) == expected


def test_undetectable_file_names_the_fields_it_saw_and_the_formats(tmp_path):
    path = jsonl(tmp_path / "pretrain.jsonl", [{"text": "只是一段预训练文本。", "source": "wiki"}])
    with pytest.raises(UserError) as e:
        convs(path)
    message = str(e.value)
    assert str(path) in message and "text, source" in message
    assert all(name in message for name in FORMATS)


def test_unknown_format_name_lists_the_choices(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "answer": "y"}])
    with pytest.raises(UserError, match="unknown conversation format 'belle'.*alpaca"):
        convs(path, format="belle")


def test_format_override_wins_over_detection(tmp_path):
    # input/output records would be detected as prompt-answer; named alpaca, input is the input.
    path = jsonl(tmp_path / "a.jsonl", [{"input": "补充", "output": "答", "instruction": "问"}])
    assert pairs(convs(path, format="alpaca")[0]) == [("user", "问\n补充"), ("assistant", "答")]


def test_empty_file_yields_nothing(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    assert convs(path) == []


# ---------------------------------------------------------------------------------------------
# Bad records: each kind names its line; skip_bad counts them

GOOD = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("bad, problem", [
    ({"messages": [{"content": "u"}, {"role": "assistant", "content": "a"}]}, "has no 'role'"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": " "}]},
     r"message 2 \(assistant\) is empty"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "tool", "content": "a"}]},
     "unknown role 'tool'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
     "message 1 is a number, not a string"),
    ({"messages": "hello"}, "'messages' is a string, not a list"),
    ({"messages": [{"role": "user", "content": "u"}]}, "no assistant turn"),
    ("{not json", "invalid JSON"),
])
def test_bad_record_names_file_and_line_or_is_counted(tmp_path, bad, problem):
    path = tmp_path / "c.jsonl"
    bad_line = bad if isinstance(bad, str) else json.dumps(bad, ensure_ascii=False)
    path.write_text(json.dumps(GOOD) + "\n" + bad_line + "\n" + json.dumps(GOOD) + "\n",
                    encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:2: .*{problem}"):
        convs(path)
    counted = BadRecords()
    assert len(convs(path, skip_bad=True, bad=counted)) == 2
    assert counted.count == 1 and counted.locations == [f"{path}:2"]


def test_bad_records_in_json_list_csv_and_formats_with_fields(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "q", "input": "", "output": "a"},
                                {"instruction": "q", "input": "", "output": ""},
                                {"instruction": "q", "input": 5, "output": "a"}]), encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:record 2: 'output' is empty"):
        convs(path)
    counted = BadRecords()
    assert len(convs(path, skip_bad=True, bad=counted)) == 1
    assert counted.problems[1] == f"{path}:record 3: 'input' is a number, not a string"

    csv_path = tmp_path / "qa.csv"
    csv_path.write_text("prompt,answer\nq,a\nq,\nq,a,extra\n", encoding="utf-8")
    counted = BadRecords()
    assert len(convs(csv_path, skip_bad=True, bad=counted)) == 1
    assert counted.locations == [f"{csv_path}:3", f"{csv_path}:4"]

    firefly = jsonl(tmp_path / "f.jsonl", [{"conversation": [{"human": "q"}]}])
    with pytest.raises(UserError, match=rf"^{firefly}:1: turn 1 has no 'assistant'"):
        convs(firefly)


def test_problems_are_reported_in_file_order_though_records_are_read_ahead(tmp_path):
    path = tmp_path / "c.jsonl"
    empty_reply = {"messages": [{"role": "user", "content": "u"},
                                {"role": "assistant", "content": ""}]}
    path.write_bytes((json.dumps(GOOD) + "\n" + json.dumps(empty_reply) + "\n{oops\n").encode()
                     + b'{"text": "\xff"}\n' + (json.dumps(GOOD) + "\n").encode())
    with pytest.raises(UserError, match=rf"^{path}:2: message 2 \(assistant\) is empty"):
        convs(path)
    counted = BadRecords()
    assert len(convs(path, skip_bad=True, bad=counted)) == 2
    assert counted.locations == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "invalid JSON" in counted.problems[1] and "not UTF-8" in counted.problems[2]


def test_a_file_of_only_unreadable_lines_still_reports_them(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("{oops\n[1,\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:1: invalid JSON"):
        convs(path)


def test_json_with_trailing_garbage_is_an_error_not_json_lines(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"prompt": "q", "answer": "a"}\n]\n]\n', encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:4: invalid JSON: Extra data"):
        convs(path)


def test_unknown_role_in_llama2_text_and_missing_label_in_redgpt_text(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("<s>Human: q</s><s>Bot: a</s>\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:1: segment 2 does not start with"):
        convs(path)
    red = jsonl(tmp_path / "r.jsonl", [{"text": "人类：问\n\n助手：答"}, {"text": "只有一段话"}])
    with pytest.raises(UserError, match=rf"^{red}:2: no '人类：'"):
        convs(red, format="babyllama-text")


# ---------------------------------------------------------------------------------------------
# Real samples in ../shared/data

def test_real_alpaca_zh_first_record_and_speed():
    path = need(SFT / "alpaca_zh" / "zh-data-part-00.json")
    start = time.perf_counter()
    bad = BadRecords()
    conversations = convs(path, skip_bad=True, bad=bad)
    elapsed = time.perf_counter() - start
    assert len(conversations) + bad.count == 10_021
    assert bad.count == 6  # records with an empty output
    assert "'output' is empty" in bad.problems[0]
    assert pairs(conversations[0]) == [
        ("user", "给出三个保持健康的秘诀。"),
        ("assistant", "1.均衡饮食，多吃水果和蔬菜。\n2. 定期锻炼，保持身体活跃和强壮。\n"
                      "3.充足的睡眠，保持规律的作息时间。")]
    assert elapsed < 2.0, f"reading 10k alpaca records took {elapsed:.2f}s"


def test_real_firefly_multiturn():
    path = need(SFT / "firefly" / "dummy_data.jsonl")
    assert detect_format(path) == "firefly"
    conversations = convs(path)
    assert len(conversations) == 33
    assert sum(len(c.messages) for c in conversations) == 308
    assert conversations[0].messages[0]["content"] == "如何保障工作中遵循正确的安全准则？"
    assert len(conversations[0].messages) == 10


def test_real_firefly_pretrain_texts_are_not_conversations():
    path = need(SFT / "firefly" / "dummy_pretrain.jsonl")
    with pytest.raises(UserError, match="fields: text"):
        detect_format(path)


def test_real_kdconv_documents_hold_the_film_passage():
    film = need(SFT / "kdconv" / "film" / "dev.json")
    conversations = convs(film)
    assert len(conversations) == 150
    first = conversations[0]
    assert first.messages[0] == {"role": "user", "content": "知道恋恋笔记本这部电影吗？"}
    assert "《恋恋笔记本》是导演尼克·卡萨维茨2004年的一部爱情片" in first.document
    assert "制片成本：2900万美元" in first.document
    assert len(convs(SFT / "kdconv")) == 600  # film and music, dev and test


def test_real_lccc_spaces_removed_and_splits():
    path = need(SFT / "lccc" / "toy_data.json")
    assert detect_format(path) == "lccc"
    everything = convs(path)
    assert len(everything) == 1400
    assert len(convs(f"{path}#train")) == 1000
    assert pairs(everything[0])[:2] == [("user", "遭淋安逸了？"), ("assistant", "是哈，你没遭撒？")]
    assert not any(" " in m["content"] and not m["content"].isascii()
                   for c in everything[:200] for m in c.messages)
    train = convs(SFT / "lccc" / "toy_train.txt")
    assert len(train) == 10_000
    assert pairs(train[0])[0] == ("user", "为什么听一面之辞就相信？只有当事人才能知道吧，咱们旁观者并不知道真相啊")


def test_real_csl_titles_become_answers():
    path = need(CSL)
    assert detect_format(path) == "csl"
    conversations = convs(path)
    assert len(conversations) == 1000
    first = conversations[0]
    assert "采用修正的Rodrigues参数(MRP)" in first.messages[0]["content"]
    assert "一种基于平方和优化的飞行器大角度机动镇定控制器设计方法" in first.messages[1]["content"]


# ---------------------------------------------------------------------------------------------
# Recipes (sft_augment)

def _summary_file(tmp_path, rows, name="s.jsonl"):
    return jsonl(tmp_path / name, [{"summary": s, "text": t} for t, s in rows])


def test_summary_templates_are_reproducible_and_seed_dependent(tmp_path):
    rows = [(f"第{i}段新闻正文，内容各不相同。", f"摘要{i}") for i in range(40)]
    path = _summary_file(tmp_path, rows)
    first = [c.messages for c in convs(path, seed=1)]
    assert first == [c.messages for c in convs(path, seed=1)]
    other = [c.messages for c in convs(path, seed=2)]
    assert sum(a != b for a, b in zip(first, other)) >= 10
    # A record gets the same templates wherever it sits in the file.
    reversed_path = _summary_file(tmp_path, rows[::-1], "r.jsonl")
    assert [c.messages for c in convs(reversed_path, seed=1)][::-1] == first
    # Several templates are in use, and every sample holds its text and summary.
    questions = {next(q for q in SUMMARY_QUESTIONS if q.replace("{text}", t) == m[0]["content"])
                 for (t, _), m in zip(rows, first)}
    assert len(questions) >= 4
    assert all(s in m[1]["content"] for (_, s), m in zip(rows, first))
    assert len(SUMMARY_ANSWERS) >= 3


CONSTRAINED = "写一篇短文。\n主题：春天\n字数：200字以内\n风格: 抒情\n语言：中文\n要求如下，请遵守。"


def test_shuffle_constraints_permutes_only_the_key_value_lines():
    lines = CONSTRAINED.split("\n")
    seen = set()
    for seed in range(20):
        out = shuffle_constraints(CONSTRAINED, random.Random(seed)).split("\n")
        assert sorted(out) == sorted(lines)
        assert out[0] == lines[0] and out[-1] == lines[-1]
        seen.add(tuple(out))
    assert len(seen) > 1


def test_shuffle_constraints_leaves_single_constraints_urls_and_numbering_alone():
    rng = random.Random(0)
    single = "请写一首诗。\n主题：秋天\n谢谢。"
    assert shuffle_constraints(single, rng) == single
    url = "打开 https://example.com\nhttps://example.org"
    assert shuffle_constraints(url, rng) == url
    numbered = "要求：\n1. 主题：海\n2. 字数：100\n3. 体裁：诗"
    for seed in range(10):
        out = shuffle_constraints(numbered, random.Random(seed)).split("\n")
        assert [line[:3] for line in out[1:]] == ["1. ", "2. ", "3. "]
        assert sorted(line[3:] for line in out[1:]) == ["主题：海", "体裁：诗", "字数：100"]


def test_augment_constraints_is_deterministic_and_leaves_inputs_alone():
    conversations = [Conversation([{"role": "user", "content": CONSTRAINED.replace("春天", str(i))},
                                   {"role": "assistant", "content": "好的。"}]) for i in range(30)]
    originals = [c.messages[0]["content"] for c in conversations]
    once = augment_constraints(conversations, probability=0.5, seed=3)
    assert [c.messages for c in once] == [c.messages for c in
                                          augment_constraints(conversations, 0.5, seed=3)]
    assert [c.messages[0]["content"] for c in conversations] == originals
    changed = sum(a.messages[0]["content"] != o for a, o in zip(once, originals))
    assert 3 <= changed <= 27
    assert all(a.messages[1] == {"role": "assistant", "content": "好的。"} for a in once)
    # Copies of one conversation (an up-weighted source) are not all shuffled alike.
    copies = augment_constraints([conversations[0]] * 20, probability=1.0, seed=3)
    assert len({c.messages[0]["content"] for c in copies}) > 1
    untouched = augment_constraints(conversations, probability=0.0, seed=3)
    assert [c.messages[0]["content"] for c in untouched] == originals


# ---------------------------------------------------------------------------------------------
# Shapes users bring: other single-turn field names, id-keyed dialogue objects, unanswered ends

@pytest.mark.parametrize("record, expected_answer", [
    ({"question": "中国的首都？", "answer": "北京"}, "北京"),
    ({"query": "中国的首都？", "response": "北京"}, "北京"),
    ({"prompt": "中国的首都？", "response": "北京"}, "北京"),
    ({"input": "中国的首都？", "target": "北京"}, "北京"),
    ({"Question": "中国的首都？", "Reference_Answer": "北京"}, "北京"),
    ({"question": "中国的首都？", "answer": "北京", "reference_answer": "北京市"}, "北京"),
    ({"instruction": "中国的首都？", "response": "北京", "category": "open_qa"}, "北京"),
])
def test_single_turn_sets_with_other_field_names_are_read(tmp_path, record, expected_answer):
    path = jsonl(tmp_path / "qa.jsonl", [record])
    assert detect_format(path) == "prompt-answer"
    (conv,) = convs(path)
    assert pairs(conv) == [("user", "中国的首都？"), ("assistant", expected_answer)]


def test_id_keyed_dialogue_object_with_usr_sys_roles_is_read(tmp_path):
    # CrossWOZ's layout: {id: {messages: [{role: usr|sys, content, ...}], goal, ...}}.
    path = tmp_path / "train.json"
    path.write_text(json.dumps({
        "11290": {"type": "单领域", "messages": [
            {"role": "usr", "content": "你好，推荐一家评分高的餐馆。", "dialog_act": []},
            {"role": "sys", "content": "推荐您去全聚德。", "dialog_act": []}]},
        "10303": {"type": "多领域", "messages": [
            {"role": "user", "content": "北京有什么景点？"}, {"role": "bot", "content": "故宫。"},
            {"role": "human", "content": "门票多少？"}, {"role": "assistant", "content": "60元。"}]},
    }, ensure_ascii=False, indent=1), encoding="utf-8")
    assert detect_format(path) == "openai"
    a, b = convs(path)
    assert pairs(a) == [("user", "你好，推荐一家评分高的餐馆。"), ("assistant", "推荐您去全聚德。")]
    assert pairs(b) == [("user", "北京有什么景点？"), ("assistant", "故宫。"),
                        ("user", "门票多少？"), ("assistant", "60元。")]
    assert a.source == f"{path}:2" and b.source.startswith(f"{path}:")


def test_undetectable_id_keyed_object_describes_its_shape_truthfully(tmp_path):
    path = tmp_path / "goals.json"
    path.write_text(json.dumps({"11290": {"goal": ["找餐馆"], "final_goal": []},
                                "10303": {"goal": ["找景点"], "final_goal": []}},
                               ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError) as e:
        convs(path)
    message = str(e.value)
    assert "an object keyed by ids ('11290', '10303', …) whose values have fields: " \
           "final_goal, goal" in message
    assert "first record's fields: 11290" not in message


def test_trailing_unanswered_user_turn_is_dropped_and_counted(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", [
        GOOD,
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": "u2"}]}])
    counted = BadRecords()
    good, cut = convs(path, skip_bad=True, bad=counted)
    assert counted.count == 0 and good.unanswered == 0
    assert pairs(cut) == [("user", "u"), ("assistant", "a")] and cut.unanswered == 1
    # Strict reading does not stop either: the answered turns are good data.
    assert len(convs(path)) == 2


def test_skipped_conversations_are_counted_by_reason_with_examples(tmp_path):
    path = tmp_path / "c.jsonl"
    empty = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]}
    path.write_text("\n".join([json.dumps(GOOD), "{oops", json.dumps(empty), "[1,", json.dumps(GOOD)])
                    + "\n", encoding="utf-8")
    counted = BadRecords()
    assert len(convs(path, skip_bad=True, bad=counted)) == 2
    assert counted.reasons == {"invalid JSON": 2, "message N (assistant) is empty": 1}
    summary = counted.summary()
    assert summary.startswith("3 bad records skipped: 2 invalid JSON (first: ")
    assert f"{path}:2: invalid JSON" in summary and f"{path}:3: message 2" in summary


@pytest.mark.parametrize("top, shape", [
    ({"11290": "just a string", "2": "x"},
     "an object keyed by ids ('11290', '2') whose values are strings"),
    ({}, "an empty JSON object"),
])
def test_undetectable_single_object_files_describe_their_shape_truthfully(tmp_path, top, shape):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(top), encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}: cannot tell the conversation format "
                                        rf"\({re.escape(shape)}\); name it with --format"):
        convs(path)


def test_records_of_a_one_line_id_keyed_object_are_located_by_their_id(tmp_path):
    empty_reply = {"messages": [{"role": "user", "content": "u"},
                                {"role": "assistant", "content": ""}]}
    path = tmp_path / "keyed_oneline.json"
    path.write_text(json.dumps({"11290": GOOD, "10303": empty_reply}), encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:1 \(id 10303\): message 2 \(assistant\) "
                                        r"is empty$"):
        convs(path)
    (good,) = convs(path, skip_bad=True, bad=BadRecords())
    assert good.source == f"{path}:1 (id 11290)"
