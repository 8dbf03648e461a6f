"""The `moss` conversation format (MOSS-003-SFT, MOSS-002 plain_text) and Safety-Prompts'
category-keyed .json files (babyllama.data.conversations)."""

from __future__ import annotations

import json

import pytest

from babyllama.data.conversations import FORMATS, detect_format
from babyllama.data.readers import BadRecords
from babyllama.errors import UserError
from test_conversations import convs, jsonl, pairs

META = ("You are an AI assistant whose name is MOSS.\n- MOSS is a conversational language model "
        "that is developed by Fudan University.\n")


def turn(human: str, moss: str, tools: bool = False, command: str = "None",
         results: str = "None") -> dict:
    """One MOSS-003 turn as fnlp writes it; `tools` adds the with-tools fields."""
    out = {"Human": f"<|Human|>: {human}<eoh>\n"}
    if tools:
        out.update({"Inner Thoughts": "<|Inner Thoughts|>: 用户需要搜索<eot>\n",
                    "Commands": f"<|Commands|>: {command}<eoc>\n",
                    "Tool Responses": f"<|Results|>: {results}<eor>\n"})
    out["MOSS"] = f"<|MOSS|>: {moss}<eom>\n"
    return out


def moss_record(turns: dict, meta: str = META, **extra) -> dict:
    return {"conversation_id": 1, "meta_instruction": meta, "num_turns": len(turns),
            "chat": turns, "category": "harmless_zh", **extra}


# ---------------------------------------------------------------------------------------------
# MOSS-003-SFT

def test_moss_003_turns_in_number_order_markers_removed_meta_instruction_is_system(tmp_path):
    # Keys written in string order (turn_1, turn_10, turn_2, ...): turn_10 is still last.
    numbers = sorted(range(1, 11), key=str)
    assert numbers[:3] == [1, 10, 2]
    chat = {f"turn_{n}": turn(f"问题{n}", f"回答{n}", tools=n % 2 == 0) for n in numbers}
    path = jsonl(tmp_path / "moss-003-sft-data.jsonl", [moss_record(chat)])
    (conv,) = convs(path)
    expected = []
    for n in range(1, 11):
        expected += [("user", f"问题{n}"), ("assistant", f"回答{n}")]
    assert pairs(conv) == expected
    assert conv.system == META.strip()
    assert conv.document is None and conv.unanswered == 0
    assert conv.source == f"{path}:1"
    text = "".join(m["content"] for m in conv.messages)
    assert not any(marker in text for marker in ("<|", "<eo", "用户需要搜索", "None"))


def test_moss_003_tool_turn_keeps_its_human_and_moss_text_only(tmp_path):
    search = 'Search("黄山 天气")'
    chat = {"turn_1": turn("黄山明天天气怎么样？", "根据搜索结果<|1|>，明天晴。", tools=True,
                           command=search, results="<|1|>: 黄山 明天 晴 15℃"),
            "turn_2": turn("谢谢", "不客气！", tools=True)}
    path = jsonl(tmp_path / "moss-003-sft-with-tools.jsonl", [moss_record(chat)])
    (conv,) = convs(path)
    assert pairs(conv) == [("user", "黄山明天天气怎么样？"),
                           ("assistant", "根据搜索结果<|1|>，明天晴。"),
                           ("user", "谢谢"), ("assistant", "不客气！")]
    text = "".join(m["content"] for m in conv.messages)
    assert "Search(" not in text and "15℃" not in text and "用户需要搜索" not in text


def test_moss_003_empty_meta_instruction_is_no_system_and_default_system_applies(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [moss_record({"turn_1": turn("你好", "你好！")}, meta="  \n"),
                                        {"chat": {"turn_1": turn("在吗", "在的")}}])
    first, second = convs(path)
    assert first.system is None and second.system is None
    assert [c.system for c in convs(path, system="你是助手。")] == ["你是助手。", "你是助手。"]
    assert pairs(second) == [("user", "在吗"), ("assistant", "在的")]


def test_moss_003_json_list_and_one_record_json_files(tmp_path):
    records = [moss_record({"turn_1": turn("一", "1")}), moss_record({"turn_1": turn("二", "2")})]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    assert [pairs(c) for c in convs(listed)] == [[("user", "一"), ("assistant", "1")],
                                                 [("user", "二"), ("assistant", "2")]]
    assert [c.source for c in convs(listed)] == [f"{listed}:record 1", f"{listed}:record 2"]
    # One conversation per file (the with-tools release): a record, not records keyed by id,
    # even when `chat` is its only field.
    for name, record in (("one.json", records[0]), ("bare.json", {"chat": records[0]["chat"]})):
        path = tmp_path / name
        path.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        assert detect_format(path) == "moss"
        assert [pairs(c) for c in convs(path)] == [[("user", "一"), ("assistant", "1")]]


def test_moss_003_string_order_would_differ_from_number_order(tmp_path):
    # turn_2 written before turn_10 and turn_10 before turn_9: only the number orders them.
    chat = {"turn_10": turn("q10", "a10"), "turn_2": turn("q2", "a2"), "turn_1": turn("q1", "a1"),
            "turn_9": turn("q9", "a9")}
    (conv,) = convs(jsonl(tmp_path / "m.jsonl", [moss_record(chat)]))
    assert [m["content"] for m in conv.messages if m["role"] == "user"] == ["q1", "q2", "q9", "q10"]


# ---------------------------------------------------------------------------------------------
# MOSS-002 plain_text

def test_moss_002_plain_text_turns_and_system(tmp_path):
    text = ("[Human]: 你好<eoh> [MOSS]: 你好！有什么可以帮你的吗？<eoa> "
            "[Human]: 讲个笑话<eoh> [MOSS]: 好的：\n从前……<eoa>")
    path = jsonl(tmp_path / "moss-002.jsonl", [
        {"plain_text": text},
        {"plain_text": "MOSS is an AI assistant. " + text},
        {"plain_text": "前言 " + text, "meta_instruction": META}])
    assert detect_format(path) == "moss"
    first, prefixed, meta = convs(path)
    assert pairs(first) == [("user", "你好"), ("assistant", "你好！有什么可以帮你的吗？"),
                            ("user", "讲个笑话"), ("assistant", "好的：\n从前……")]
    assert first.system is None
    assert prefixed.system == "MOSS is an AI assistant." and pairs(prefixed) == pairs(first)
    assert meta.system == META.strip()


def test_moss_002_unanswered_last_human_turn_is_dropped_and_counted(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [{"plain_text": "[Human]: 问<eoh> [MOSS]: 答<eoa> [Human]: 还在吗<eoh>"}])
    (conv,) = convs(path)
    assert pairs(conv) == [("user", "问"), ("assistant", "答")] and conv.unanswered == 1


# ---------------------------------------------------------------------------------------------
# Bad records: one line naming file:line, or counted with skip_bad

GOOD = moss_record({"turn_1": turn("你好", "你好！")})


@pytest.mark.parametrize("bad, problem", [
    (moss_record({"turn_1": {"Human": "<|Human|>: 你好<eoh>\n"}}), "turn_1 has no 'MOSS'"),
    (moss_record({"turn_1": turn("a", "b"), "turn_2": {"MOSS": "<|MOSS|>: x<eom>"}}),
     "turn_2 has no 'Human'"),
    (moss_record([turn("a", "b")]), "'chat' is a list, not an object"),
    (moss_record({"turn_1": "你好"}), "turn_1 is a string, not an object"),
    (moss_record({"first": turn("a", "b")}), "'chat' key 'first' is not turn_N"),
    (moss_record({}), "'chat' has no turns"),
    (moss_record({"turn_1": turn("", "b")}), "turn_1 has an empty 'Human'"),
    (moss_record({"turn_1": turn("a", "  ")}), "turn_1 has an empty 'MOSS'"),
    (moss_record({"turn_1": {"Human": 3, "MOSS": "b"}}), "'turn_1.Human' is a number"),
    ({"plain_text": "只是一段没有标记的文字"}, r"'plain_text' has no '\[Human\]:'"),
    ({"plain_text": ""}, r"'plain_text' has no '\[Human\]:'"),
    ({"plain_text": "[Human]: 问<eoh> [MOSS]: <eoa>"}, r"turn 2 \(assistant\) is empty"),
    ({"conversation_id": 3}, "no 'chat' or 'plain_text' field"),
])
def test_moss_bad_record_names_file_and_line_or_is_counted(tmp_path, bad, problem):
    path = jsonl(tmp_path / "m.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(UserError, match=rf"^{path}:2: .*{problem}") as e:
        convs(path)
    assert "\n" not in str(e.value)
    counted = BadRecords()
    assert len(convs(path, skip_bad=True, bad=counted)) == 2
    assert counted.count == 1 and counted.locations == [f"{path}:2"]


def test_moss_bad_record_in_json_list_names_the_record(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([GOOD, moss_record({"turn_1": {"Human": "<|Human|>: x<eoh>"}})]),
                    encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:record 2: turn_1 has no 'MOSS'$"):
        convs(path)


# ---------------------------------------------------------------------------------------------
# Detection: moss is found, and takes no other format's records

@pytest.mark.parametrize("record, expected", [
    (moss_record({"turn_1": turn("a", "b")}), "moss"),
    (moss_record({"turn_1": turn("a", "b", tools=True)}), "moss"),
    ({"plain_text": "[Human]: a<eoh> [MOSS]: b<eoa>"}, "moss"),
    # Other formats' records with a `chat` or `plain_text` field that is not MOSS's
    ({"prompt": "q", "answer": "a", "chat": {"x": 1}}, "prompt-answer"),
    ({"prompt": "q", "answer": "a", "plain_text": "no markers"}, "prompt-answer"),
    ({"conversation": [{"human": "x", "assistant": "y"}], "chat": {"turn_1": {"x": 1}}}, "firefly"),
    ({"messages": [{"role": "user", "content": "x"}], "plain_text": "[Human]: x"}, "openai"),
    ({"instruction": "x", "input": "", "output": "y"}, "alpaca"),
    ({"text": "人类：x\n\n助手：y"}, "babyllama-text"),
])
def test_moss_detection(tmp_path, record, expected):
    assert detect_format(jsonl(tmp_path / "a.jsonl", [record])) == expected


def test_moss_is_a_named_format():
    assert "moss" in FORMATS and "MOSS-003" in FORMATS["moss"]


def test_moss_format_can_be_named(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [moss_record({"turn_1": turn("a", "b")})])
    assert pairs(convs(path, format="moss")[0]) == [("user", "a"), ("assistant", "b")]


# ---------------------------------------------------------------------------------------------
# Safety-Prompts (thu-coai): one object keyed by category, each a list of {prompt, response, type}

def _safety_file(tmp_path, name, categories: dict[str, int]):
    top = {category: [{"prompt": f"{category}问题{i}", "response": f"{category}回答{i}",
                       "type": category} for i in range(1, n + 1)]
           for category, n in categories.items()}
    path = tmp_path / name
    path.write_text(json.dumps(top, ensure_ascii=False, indent=4), encoding="utf-8")
    return path


def test_safety_prompts_whole_file_reads_every_category(tmp_path):
    path = _safety_file(tmp_path, "typical_safety_scenarios.json",
                        {"Unfairness_And_Discrimination": 3, "Insult": 2, "Mental_Health": 1})
    got = convs(path)
    assert [pairs(c) for c in got] == [
        [("user", f"{cat}问题{i}"), ("assistant", f"{cat}回答{i}")]
        for cat, n in (("Unfairness_And_Discrimination", 3), ("Insult", 2), ("Mental_Health", 1))
        for i in range(1, n + 1)]
    assert got[3].source == f"{path}:Insult record 1"
    assert all(c.system is None for c in got)
    assert detect_format(path) == "prompt-answer"


def test_safety_prompts_category_is_picked_with_a_split(tmp_path):
    path = _safety_file(tmp_path, "instruction_attack_scenarios.json",
                        {"Goal_Hijacking": 2, "Prompt_Leaking": 2, "Reverse_Exposure": 1})
    got = convs(f"{path}#Prompt_Leaking")
    assert [pairs(c) for c in got] == [
        [("user", f"Prompt_Leaking问题{i}"), ("assistant", f"Prompt_Leaking回答{i}")]
        for i in (1, 2)]
    assert [c.source for c in got] == [f"{path}:Prompt_Leaking record 1",
                                       f"{path}:Prompt_Leaking record 2"]
    assert detect_format(f"{path}#Prompt_Leaking") == "prompt-answer"
    with pytest.raises(UserError, match=r"#Insult: no key 'Insult' \(keys: Goal_Hijacking, "):
        convs(f"{path}#Insult")


def test_safety_prompts_bad_record_names_its_category(tmp_path):
    path = _safety_file(tmp_path, "typical_safety_scenarios.json", {"Insult": 2})
    top = json.loads(path.read_text(encoding="utf-8"))
    top["Insult"][1]["response"] = ""
    path.write_text(json.dumps(top, ensure_ascii=False, indent=4), encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:Insult record 2: 'response' is empty"):
        convs(path)
