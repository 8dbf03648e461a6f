"""The multiple-choice task: loading CMMLU / C-Eval / jsonl exams, CMMLU's prompt format and
few-shot fitting, both scoring methods against transformers' Llama, clear errors for bad
input, and chance-level accuracy for a random model on the real CMMLU."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from babyllama.errors import UserError
from babyllama.eval.choice import (ChoiceOptions, fitted_requests, load_exam, requests,
                                   run_choice)
from babyllama.eval.prompting import question_prompt_ids
from babyllama.model.llama import Llama

from conftest import SHARED_DATA, hf_twin
from test_model import tiny_config

CMMLU = SHARED_DATA / "eval" / "cmmlu"

HEADER = "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"

# (question, A, B, C, D, answer)
AGRONOMY = [
    ("水稻属于哪一类作物", "粮食作物", "经济作物", "油料作物", "饲料作物", "A"),
    ("小麦主要种植在中国的哪个地区", "华南", "华北", "西南", "东南", "B"),
    ("土壤的基本肥力包括", "水分", "空气", "养分", "以上都是", "D"),
]
ANATOMY = [
    ("人体最大的器官是", "心脏", "肝脏", "皮肤", "肺", "C"),
    ("成年人有多少块骨头", "206", "306", "106", "256", "A"),
]
DEV = [
    ("玉米原产于", "美洲", "亚洲", "欧洲", "非洲", "A"),
    ("一年两熟制常见于", "东北平原", "华北平原和长江流域很多地方都有的一种种植制度", "青藏高原", "内蒙古", "B"),
]


def write_csv(path: Path, rows, header=",Question,A,B,C,D,Answer", index=True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header] + [",".join(([str(i)] if index else []) + list(r)) for i, r in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cmmlu_folder(root: Path) -> Path:
    write_csv(root / "test" / "agronomy.csv", AGRONOMY)
    write_csv(root / "test" / "anatomy.csv", ANATOMY)
    write_csv(root / "dev" / "agronomy.csv", DEV)
    write_csv(root / "dev" / "anatomy.csv", DEV[:1])
    return root


def ceval_folder(root: Path) -> Path:
    header = "id,question,A,B,C,D,answer,explanation"
    write_csv(root / "dev" / "high_school_physics_dev.csv", [r + ("解析",) for r in DEV], header)
    write_csv(root / "val" / "high_school_physics_val.csv", [r + ("",) for r in AGRONOMY], header)
    write_csv(root / "test" / "high_school_physics_test.csv",
              [r[:5] + ("", "") for r in ANATOMY], header)
    return root


def tiny_model(tokenizer, context: int = 512, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(tiny_config(vocab_size=len(tokenizer), max_position_embeddings=context)).eval()


def hf_logprob(hf, context: list[int], continuation: list[int]) -> float:
    """One full forward pass of one sequence: the continuation's summed log-probability."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0].double(), dim=-1)
    return sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))


# ----------------------------------------------------------------------------------------
# Scoring against transformers


def test_logprobs_and_accuracies_equal_transformers_llama_one_sequence_at_a_time(
        tiny_tokenizer, tmp_path):
    data = cmmlu_folder(tmp_path / "cmmlu")
    model = tiny_model(tiny_tokenizer)
    hf = hf_twin(model)
    result = run_choice(model, tiny_tokenizer, ChoiceOptions(str(data), shots=1, batch_size=3,
                                                             progress=False))
    exam = load_exam(data)
    questions = {q.where: q for qs in exam.questions.values() for q in qs}
    hits = {"letter": [], "text": [], "norm": []}
    for ex in result.examples:
        q = questions[ex["where"]]
        shots = exam.shots[q.subject][:1]
        name = exam.names[q.subject]
        letter = [hf_logprob(hf, c, t)
                  for c, t in requests(tiny_tokenizer, q, shots, name, cloze=False, chat=False)]
        text = [hf_logprob(hf, c, t)
                for c, t in requests(tiny_tokenizer, q, shots, name, cloze=True, chat=False)]
        assert ex["letter_logprobs"] == pytest.approx(letter, abs=1e-4)
        assert ex["text_logprobs"] == pytest.approx(text, abs=1e-4)
        norm = [lp / len(o) for lp, o in zip(text, q.options)]
        preds = {k: "ABCD"[max(range(4), key=v.__getitem__)]
                 for k, v in (("letter", letter), ("text", text), ("norm", norm))}
        assert (ex["letter_pred"], ex["text_pred"], ex["text_norm_pred"]) == \
            (preds["letter"], preds["text"], preds["norm"])
        for k in hits:
            hits[k].append((q.subject, preds[k] == ex["answer"]))
    for k, key in (("letter", "acc_letter"), ("text", "acc_text"), ("norm", "acc_text_norm")):
        per_subject = [[h for s, h in hits[k] if s == subject] for subject in ("agronomy", "anatomy")]
        macro = sum(sum(h) / len(h) for h in per_subject) / 2
        assert result.metrics[key] == pytest.approx(macro)
        assert result.metrics[key + "_micro"] == pytest.approx(sum(h for _, h in hits[k]) / 5)
    assert result.metrics["n"] == 5 and result.metrics["subjects"] == 2
    assert result.metrics["chance"] == 0.25
    assert [r["subject"] for r in result.rows] == ["agronomy", "anatomy", "average (macro)"]
    assert result.rows[0]["n"] == 3 and result.rows[-1]["letter acc"] == result.metrics["acc_letter"]


# ----------------------------------------------------------------------------------------
# Prompts


def test_plain_prompt_is_cmmlu_direct_answer_format_with_dev_shots(tiny_tokenizer, tmp_path):
    exam = load_exam(cmmlu_folder(tmp_path / "cmmlu"))
    q = exam.questions["agronomy"][1]
    reqs = requests(tiny_tokenizer, q, exam.shots["agronomy"], "农学", cloze=False, chat=False)
    expected = (HEADER
                + "题目：玉米原产于\nA. 美洲\nB. 亚洲\nC. 欧洲\nD. 非洲\n答案是：A\n\n"
                + "题目：一年两熟制常见于\nA. 东北平原\nB. 华北平原和长江流域很多地方都有的一种种植制度\n"
                  "C. 青藏高原\nD. 内蒙古\n答案是：B\n\n"
                + "题目：小麦主要种植在中国的哪个地区\nA. 华南\nB. 华北\nC. 西南\nD. 东南\n答案是：")
    for letter, (ctx, cont) in zip("ABCD", reqs):
        assert ctx[0] == tiny_tokenizer.bos_id and len(cont) == 1
        assert tiny_tokenizer.decode(ctx + cont) == expected + letter
    cloze = requests(tiny_tokenizer, q, exam.shots["agronomy"][:1], "农学", cloze=True, chat=False)
    for option, (ctx, cont) in zip(q.options, cloze):
        assert tiny_tokenizer.decode(ctx + cont) == (
            "以下是关于农学的单项选择题，请直接给出正确答案。\n\n题目：玉米原产于\n答案是：美洲\n\n"
            "题目：小麦主要种植在中国的哪个地区\n答案是：" + option)


def test_chat_prompt_has_header_in_first_user_turn_and_shots_as_turns(tiny_tokenizer, tmp_path):
    exam = load_exam(cmmlu_folder(tmp_path / "cmmlu"))
    q, shot = exam.questions["agronomy"][0], exam.shots["agronomy"][0]
    shot_block = "题目：玉米原产于\nA. 美洲\nB. 亚洲\nC. 欧洲\nD. 非洲\n答案是："
    q_block = "题目：水稻属于哪一类作物\nA. 粮食作物\nB. 经济作物\nC. 油料作物\nD. 饲料作物\n答案是："
    prompt = question_prompt_ids(tiny_tokenizer, [(HEADER + shot_block, "A")], q_block, chat=True)
    reqs = requests(tiny_tokenizer, q, [shot], "农学", cloze=False, chat=True)
    assert reqs == [(prompt, tiny_tokenizer.encode(letter)[:1]) for letter in "ABCD"]
    zero = requests(tiny_tokenizer, q, [], "农学", cloze=True, chat=True)
    assert zero[1] == (question_prompt_ids(tiny_tokenizer, [], HEADER.replace("的选项", "")
                                  + "题目：水稻属于哪一类作物\n答案是：", chat=True),
                       tiny_tokenizer.encode("经济作物"))
    opts = ChoiceOptions(str(exam.path), shots=1, chat=True, progress=False)
    result = run_choice(tiny_model(tiny_tokenizer), tiny_tokenizer, opts)
    assert result.metrics["n"] == 5 and result.settings["chat"] is True


class MergingTokenizer:
    """Characters as ids, except that "：A" is one token: merges across the prompt/answer
    boundary, as a BPE or SentencePiece vocabulary may."""

    bos_id = 0

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            merged = text.startswith("：A", i)
            ids.append(1 if merged else ord(text[i]))
            i += 2 if merged else 1
        return ids


def test_letter_token_is_the_first_after_the_prefix_shared_with_the_prompt(tmp_path):
    tok = MergingTokenizer()
    q = load_exam(cmmlu_folder(tmp_path / "cmmlu")).questions["agronomy"][0]
    prompt = [0] + tok.encode(HEADER + "题目：水稻属于哪一类作物\nA. 粮食作物\nB. 经济作物\n"
                                       "C. 油料作物\nD. 饲料作物\n答案是：")
    reqs = requests(tok, q, [], "农学", cloze=False, chat=False)
    assert reqs[0] == (prompt[:-1], [1])  # "：A" scored in place of "："
    assert reqs[1:] == [(prompt, [ord(letter)]) for letter in "BCD"]


def test_shots_are_dropped_longest_first_when_the_context_is_small(tiny_tokenizer, tmp_path):
    exam = load_exam(cmmlu_folder(tmp_path / "cmmlu"))
    q, shots = exam.questions["agronomy"][0], exam.shots["agronomy"]
    full = requests(tiny_tokenizer, q, shots, "农学", cloze=False, chat=False)
    without_long = requests(tiny_tokenizer, q, shots[:1], "农学", cloze=False, chat=False)
    need = len(without_long[0][0])
    assert len(full[0][0]) > need
    reqs, kept = fitted_requests(tiny_tokenizer, q, shots, "农学", cloze=False, chat=False,
                                 context=need)
    assert (reqs, kept) == (without_long, 1)  # the second, longer shot went
    reqs, kept = fitted_requests(tiny_tokenizer, q, shots, "农学", cloze=False, chat=False,
                                 context=need - 1)
    assert kept == 0
    # Counted in the result: too small for some shots, then too small for any prompt at all.
    opts = ChoiceOptions(str(exam.path), shots=2, progress=False)
    metrics = run_choice(tiny_model(tiny_tokenizer, context=need), tiny_tokenizer, opts).metrics
    assert metrics["shots_dropped"] == 5 and metrics["truncated"] == 0  # anatomy has 1 dev shot
    metrics = run_choice(tiny_model(tiny_tokenizer, context=40), tiny_tokenizer, opts).metrics
    assert metrics["shots_dropped"] == 5 and metrics["truncated"] == 5


# ----------------------------------------------------------------------------------------
# Loading


def test_loads_cmmlu_layout_with_dev_shots_and_chinese_subject_names(tmp_path):
    exam = load_exam(cmmlu_folder(tmp_path / "cmmlu"))
    assert exam.split == "test" and list(exam.questions) == ["agronomy", "anatomy"]
    q = exam.questions["agronomy"][2]
    assert (q.question, q.options, q.answer) == ("土壤的基本肥力包括", ["水分", "空气", "养分", "以上都是"], 3)
    assert q.where == f"{tmp_path / 'cmmlu' / 'test' / 'agronomy.csv'}:4"
    assert [s.question for s in exam.shots["agronomy"]] == ["玉米原产于", "一年两熟制常见于"]
    assert exam.names == {"agronomy": "农学", "anatomy": "解剖学"}
    assert list(load_exam(tmp_path / "cmmlu", split="dev").questions["agronomy"]) != []


def test_ceval_layout_defaults_to_val_when_test_has_no_answers(tmp_path):
    root = ceval_folder(tmp_path / "ceval")
    exam = load_exam(root)
    assert exam.split == "val" and list(exam.questions) == ["high_school_physics"]
    assert len(exam.questions["high_school_physics"]) == 3
    assert len(exam.shots["high_school_physics"]) == 2
    assert exam.names["high_school_physics"] == "高中物理"  # C-Eval's name, not CMMLU's 高中物理学
    with pytest.raises(UserError, match=r"high_school_physics_test\.csv:2: no answer"):
        load_exam(root, split="test")


def test_headers_are_case_insensitive_and_a_utf8_bom_is_accepted(tmp_path):
    path = write_csv(tmp_path / "x" / "test" / "quiz.csv", [("问题", "是", "否", "b")],
                     "ID,QUESTION,a,b,ANSWER,Explanation")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    q = load_exam(tmp_path / "x").questions["quiz"][0]
    assert (q.question, q.options, q.answer, q.subject) == ("问题", ["是", "否"], 1, "quiz")


def test_jsonl_with_choices_list_or_letter_keys_and_a_shots_file(tiny_tokenizer, tmp_path):
    path = tmp_path / "exam.jsonl"
    records = [{"question": "一加一等于几", "choices": ["一", "二", "三"], "answer": 1},
               {"question": "天空是什么颜色", "A": "蓝色", "B": "绿色", "answer": "a",
                "subject": "common"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n",
                    encoding="utf-8")
    shots = tmp_path / "shots.jsonl"
    shots.write_text(json.dumps({"question": "二加二等于几", "choices": ["四", "五"], "answer": "A"},
                                ensure_ascii=False) + "\n", encoding="utf-8")
    exam = load_exam(path, shots_file=shots)
    assert exam.split is None and list(exam.questions) == ["common", "exam"]
    assert exam.questions["exam"][0].options == ["一", "二", "三"]
    assert exam.questions["exam"][0].answer == 1 and exam.questions["common"][0].answer == 0
    assert exam.questions["common"][0].where == f"{path}:2"
    assert [s.question for s in exam.shots["exam"]] == ["二加二等于几"] == \
        [s.question for s in exam.shots["common"]]
    result = run_choice(tiny_model(tiny_tokenizer), tiny_tokenizer,
                        ChoiceOptions(str(path), shots=1, shots_file=str(shots), progress=False))
    assert result.metrics["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert result.metrics["shots_dropped"] == 0 and result.metrics["n"] == 2


def test_subjects_filter_and_limit_choose_the_questions(tiny_tokenizer, tmp_path):
    data = str(cmmlu_folder(tmp_path / "cmmlu"))
    opts = ChoiceOptions(data, subjects=["agronomy"], limit=2, progress=False)
    result = run_choice(tiny_model(tiny_tokenizer), tiny_tokenizer, opts)
    assert [e["where"].rsplit(":", 1)[1] for e in result.examples] == ["2", "3"]
    assert result.metrics["subjects"] == 1 and result.rows[0]["subject"] == "agronomy"
    with pytest.raises(UserError, match="unknown subject 'botany' .*known: agronomy, anatomy"):
        run_choice(None, tiny_tokenizer, ChoiceOptions(data, subjects=["botany"]))


# ----------------------------------------------------------------------------------------
# Bad input: one clear line naming the file (and line)


def bad_csv(root: Path, rows, header=",Question,A,B,C,D,Answer") -> Path:
    write_csv(root / "d" / "test" / "bad.csv", rows, header)
    return root / "d"


def bad_bytes(root: Path, data: bytes) -> Path:
    (root / "d" / "test").mkdir(parents=True)
    (root / "d" / "test" / "bad.csv").write_bytes(data)
    return root / "d"


def bad_file(root: Path, name: str, text: str) -> Path:
    (root / name).write_text(text, encoding="utf-8")
    return root / name


@pytest.mark.parametrize("make, message", [
    (lambda p: bad_csv(p, AGRONOMY, ",Question,A,B,C,D,Key"),
     r"test/bad\.csv:1: no 'answer' column \(header: ,Question,A,B,C,D,Key\)"),
    (lambda p: bad_csv(p, [r[:5] for r in AGRONOMY], ",Question,A,B,D,Answer"),
     r"test/bad\.csv:1: option columns must be A, B, \.\.\. consecutive"),
    (lambda p: bad_csv(p, AGRONOMY[:1] + [AGRONOMY[1][:5] + ("E",)]),
     r"test/bad\.csv:3: answer 'E' is not one of the options A-D"),
    (lambda p: bad_csv(p, [AGRONOMY[0][:3]]), r"test/bad\.csv:2: 4 fields, the header has 7"),
    (lambda p: bad_csv(p, []), r"test/bad\.csv: no questions"),
    (lambda p: bad_bytes(p, b""), r"test/bad\.csv: empty file"),
    (lambda p: bad_bytes(p, ",Question,A,B,C,D,Answer\n0,问题,甲,乙,丙,丁,A\n".encode("gbk")),
     r"test/bad\.csv:2: not UTF-8"),
    (lambda p: write_csv(p / "flat" / "x.csv", AGRONOMY).parent,
     r"flat: no split subfolders holding CSV files"),
    (lambda p: bad_file(p, "e.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 0}\n{oops\n'),
     r"e\.jsonl:2: not valid JSON"),
    (lambda p: bad_file(p, "e.jsonl", '{"question": "q", "A": "a", "C": "c", "answer": "A"}\n'),
     r"e\.jsonl:1: give the options as 'choices'"),
    (lambda p: bad_file(p, "e.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 2}\n'),
     r"e\.jsonl:1: answer index 2 is outside the options 0-1"),
    (lambda p: bad_file(p, "e.jsonl", ""), r"e\.jsonl: empty file"),
    (lambda p: bad_file(p, "e.txt", "x"), r"e\.txt: expected a \.csv or \.jsonl file"),
])
def test_bad_input_names_the_file_and_line(tmp_path, make, message):
    with pytest.raises(UserError, match=message) as e:
        load_exam(make(tmp_path))
    assert "\n" not in str(e.value)


def test_missing_split_lists_the_splits_found(tmp_path):
    with pytest.raises(UserError, match=r"no 'val' split \(found: dev, test\)"):
        load_exam(cmmlu_folder(tmp_path / "cmmlu"), split="val")


def test_k_shot_without_a_dev_split_is_an_error(tiny_tokenizer, tmp_path):
    write_csv(tmp_path / "d" / "test" / "agronomy.csv", AGRONOMY)
    with pytest.raises(UserError, match=r"3-shot needs examples: a dev split"):
        run_choice(tiny_model(tiny_tokenizer), tiny_tokenizer,
                   ChoiceOptions(str(tmp_path / "d"), shots=3))


# ----------------------------------------------------------------------------------------
# The real CMMLU


needs_cmmlu = pytest.mark.skipif(not CMMLU.exists(), reason="shared CMMLU data absent")


@needs_cmmlu
def test_real_cmmlu_test_split_has_11582_questions_in_67_subjects():
    exam = load_exam(CMMLU)
    assert exam.split == "test" and len(exam.questions) == 67
    assert sum(len(qs) for qs in exam.questions.values()) == 11582
    assert all(len(exam.shots[s]) == 5 for s in exam.questions)
    assert all(name != s.replace("_", " ") for s, name in exam.names.items())


@needs_cmmlu
def test_random_model_scores_near_chance_on_real_cmmlu(tiny_tokenizer):
    subjects = ["agronomy", "anatomy", "arts", "astronomy", "economics", "genetics",
                "marketing", "world_history"]
    opts = ChoiceOptions(str(CMMLU), subjects=subjects, limit=10, progress=False, batch_size=32)
    result = run_choice(tiny_model(tiny_tokenizer, context=1024), tiny_tokenizer, opts)
    m = result.metrics
    assert m["n"] == 80 and m["subjects"] == 8 and m["chance"] == 0.25
    assert 0.1 <= m["acc_letter"] <= 0.42 and 0.1 <= m["acc_letter_micro"] <= 0.42
    assert all(0.0 <= m[k] <= 0.6 for k in ("acc_text", "acc_text_norm"))
    assert all(math.isfinite(x) for e in result.examples for x in e["letter_logprobs"])


# ----------------------------------------------------------------------------------------
# Reading comprehension


def test_reading_comprehension_passage_options_list_and_letter_index_or_text_answers(
        tiny_tokenizer, tmp_path):
    passage = ["男：你明天去图书馆吗？", "女：不去，我要去医院看奶奶。"]
    records = [
        {"context": passage, "question": "女的明天去哪儿？", "choice": ["图书馆", "医院", "学校"],
         "answer": "医院"},                                              # C3: the option's text
        {"passage": "长城是中国古代的军事防御工程。", "question": "长城是做什么用的？",
         "options": ["防御", "灌溉", "运输", "祭祀"], "answer": "A"},     # RACE style: a letter
        {"article": "黄河是中国第二长河。", "question": "黄河是第几长河？",
         "options": ["第一", "第二"], "answer": 1},                      # a 0-based index
    ]
    path = tmp_path / "rc.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    qs = load_exam(path).questions["rc"]
    assert [q.answer for q in qs] == [1, 0, 1]
    assert qs[0].passage == "男：你明天去图书馆吗？\n女：不去，我要去医院看奶奶。"
    assert qs[0].where == f"{path}:2" and qs[1].where.startswith(f"{path}:")
    (ctx, cont), *_ = requests(tiny_tokenizer, qs[1], [], "rc", cloze=False, chat=False)
    assert tiny_tokenizer.decode(ctx).endswith(
        "文章：长城是中国古代的军事防御工程。\n题目：长城是做什么用的？\nA. 防御\nB. 灌溉\nC. 运输\nD. 祭祀\n答案是：")
    result = run_choice(tiny_model(tiny_tokenizer), tiny_tokenizer, ChoiceOptions(str(path), progress=False))
    assert result.metrics["n"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"passage": "p", "question": "q", "options": ["甲", "乙"],
                               "answer": "丙"}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:1: answer '丙' is not one of the options A-B"):
        load_exam(bad)


def test_reading_comprehension_csv_passage_column_is_shown_before_the_question(tmp_path):
    path = write_csv(tmp_path / "rc.csv", [("天空是蓝色的。", "天空什么颜色", "蓝", "红", "A")],
                     "passage,question,A,B,answer", index=False)
    (q,) = load_exam(path).questions["rc"]
    assert (q.passage, q.question, q.options, q.answer) == ("天空是蓝色的。", "天空什么颜色", ["蓝", "红"], 0)


@pytest.mark.parametrize("answer, shown", [(True, "true"), (1.5, "1.5"), ([0], "[0]")])
def test_an_answer_of_another_type_is_named_not_taken_for_a_missing_one(tmp_path, answer, shown):
    path = bad_file(tmp_path, "e.jsonl", json.dumps({"question": "q", "choices": ["a", "b"],
                                                     "answer": answer}) + "\n")
    with pytest.raises(UserError, match=rf"^{path}:1: answer must be a letter, a 0-based index "
                                        rf"or the option's text, got {re.escape(shown)}$"):
        load_exam(path)


def test_an_answer_that_is_the_text_of_two_identical_options_is_refused(tmp_path):
    path = bad_file(tmp_path, "e.jsonl", json.dumps({"question": "q", "options": ["1/16", "3/16", "1/16"],
                                                     "answer": "1/16"}) + "\n")
    with pytest.raises(UserError, match=rf"^{path}:1: answer '1/16' is ambiguous: options A and C "
                                        r"are both '1/16'"):
        load_exam(path)
    same = bad_file(tmp_path, "s.jsonl", json.dumps({"question": "q", "options": ["a", "a"],
                                                     "answer": "a"}) + "\n")
    with pytest.raises(UserError, match=r"answer 'a' is ambiguous: options A and B are both 'a'"):
        load_exam(same)
    # By letter the answer is clear, duplicates or not (CMMLU's genetics has such a question).
    letter = bad_file(tmp_path, "l.jsonl", json.dumps({"question": "q", "options": ["1/16", "3/16", "1/16"],
                                                       "answer": "B"}) + "\n")
    assert load_exam(letter).questions["l"][0].answer == 1


def test_missing_options_error_names_the_options_lists_that_work(tmp_path):
    path = bad_file(tmp_path, "e.jsonl", '{"question": "q", "answer": "A"}\n')
    with pytest.raises(UserError, match=r"give the options as 'choices': \[\.\.\.\] \(or 'options', "):
        load_exam(path)


def test_an_unclosed_quote_in_an_exam_csv_names_its_row(tmp_path):
    path = write_csv(tmp_path / "d" / "test" / "agronomy.csv", AGRONOMY)
    path.write_text(path.read_text(encoding="utf-8") + '3,"未闭合,甲,乙,丙,丁,A\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"agronomy\.csv:5: unclosed quote \(the quoted field runs "
                                        r"to the end of the file\)$"):
        load_exam(tmp_path / "d")


def test_an_answer_given_by_letter_whose_text_is_another_option_too_is_refused():
    """Identical options score identically in cloze: with the answer among them, accuracy
    would depend on which one the tie goes to. Duplicates that are not the answer stay fine
    (real CMMLU has A = C with answer B)."""
    from babyllama.eval.choice import make_question

    with pytest.raises(UserError, match=r"the answer A \('2'\) is also option B"):
        make_question("q.jsonl:1", "s", "1+1=?", ["2", "2", "3", "4"], "A")
    with pytest.raises(UserError, match="is also option B"):
        make_question("q.jsonl:1", "s", "1+1=?", ["2", "2", "3", "4"], 0)
    assert make_question("q.jsonl:1", "s", "1+1=?", ["1", "2", "1", "4"], "B").answer == 1
