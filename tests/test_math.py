"""Math word problems (reading sets, the built-in arith-zh generator), final-answer extraction
and checking, the RL reward, and the `math` evaluation task."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from babyllama.data.conversations import detect_format, iter_conversations
from babyllama.data.problems import (ARITH_SIZES, ASK, ITEMS, NAMES, SCENES, TEMPLATES, Problem,
                                     arithmetic_answer_text, arithmetic_problems, iter_problems)
from babyllama.data.records import BadRecords
from babyllama.errors import UserError
from babyllama.eval import math as math_task
from babyllama.eval.math import (MathOptions, answers_match, extract_answer, has_answer_format,
                                 math_reward, parse_value, pass_at_k, run_math)
from babyllama.eval.tasks import task_options
from babyllama.infer.config import GenerationConfig
from babyllama.infer.generate import Completion

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
APE210K = SHARED / "math" / "ape210k_valid.jsonl"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- answers

@pytest.mark.parametrize("text,answer", [
    ("7+5=12，所以答案是12。", "12"),
    ("答案：68", "68"),
    ("答案是：(1/3)", "(1/3)"),
    ("最终答案为 2(1/3) 个", "2(1/3)"),
    ("答案是-3。", "-3"),
    ("温度是-3度", "-3"),
    ("5-3=2", "2"),
    ("5-3", "3"),                       # a minus after a digit is subtraction
    ("10 - 3", "3"),
    ("一共有1,000个", "1000"),
    ("3.5。", "3.5"),
    ("增长了25%", "25%"),
    ("增长了２５％", "25%"),              # full-width digits and percent sign
    ("答案是１／３", "1/3"),
    ("答案是（１／３）", "(1/3)"),
    ("答案是12个，他还有5个苹果。", "12"),  # the stated answer, not the last number
    ("答案是什么？7+5=12", "12"),          # no number right after 答案: the last number
    ("所以 \\boxed{12}，共3步", "12"),      # \boxed wins
    ("\\boxed{\\frac{1}{3}}", "(1/3)"),
    ("The answer is 72.", "72"),
    ("She pays 5 dollars.\n#### 1,234", "1234"),
    ("小明有几个苹果？", None),
    ("", None),
])
def test_extract_answer_finds_the_final_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("answer,value", [
    ("45", Fraction(45)), ("3.7", Fraction(37, 10)), ("(11/20)", Fraction(11, 20)),
    ("525/7", Fraction(75)), ("72%", Fraction(18, 25)), ("93.75%", Fraction(15, 16)),
    ("23(1/3)", Fraction(70, 3)), ("-2(1/3)", Fraction(-7, 3)), ("-3", Fraction(-3)),
    ("1,000", Fraction(1000)), ("１２。", Fraction(12)), (" 12 ", Fraction(12)),
    ("1 + 2", Fraction(3)), ("1 2", None),
    # Ape210K's unevaluated expression answers
    ("808-432", Fraction(376)), ("160/(1-20%)", Fraction(200)), ("(3/10)/(14/15)", Fraction(9, 28)),
    ("(6/5)/0.35-(1.7+(1/3))", Fraction(6, 5) / Fraction(35, 100) - Fraction(17, 10) - Fraction(1, 3)),
    ("abc", None), ("", None), ("12元", None), ("1/0", None), ("2(3+4)", None), ("(1/3", None),
    ("1.2.3", None), ("--", None),
])
def test_parse_value_reads_ape210k_answer_forms_exactly(answer, value):
    assert parse_value(answer) == value


@pytest.mark.parametrize("predicted,reference,match", [
    ("12", "12", True), ("12.0", "12", True), ("0.5", "(1/2)", True), ("50%", "0.5", True),
    ("7/3", "2(1/3)", True), ("376", "808-432", True), ("1,000", "1000", True),
    ("0.33", "(1/3)", True),            # a repeating decimal correctly rounded to 2 places
    ("33.33%", "(1/3)", True),
    ("(1/3)", "0.33", True),
    ("0.67", "(2/3)", True),
    ("0.3", "(1/3)", False),            # one place is not enough
    ("0.34", "(1/3)", False),           # wrongly rounded
    ("100009", "100000", False),        # no relative tolerance for integers
    ("25", "25%", False),
    (None, "12", False), ("abc", "12", False), ("12", "abc", False),
])
def test_answers_match_equal_values_or_correctly_rounded_decimals(predicted, reference, match):
    assert answers_match(predicted, reference) is match


@pytest.mark.parametrize("completion,bonus,reward", [
    ("7+5=12，所以答案是12。", 0.0, 1.0),
    ("7+5=12，所以答案是12。", 0.1, 1.1),
    ("7+5=12", 0.1, 1.0),               # right, but not stated as an answer: no bonus
    ("答案是13。", 0.1, 0.1),            # wrong, but in the expected form
    ("答案：13", 0.0, 0.0),
    ("我不知道", 0.1, 0.0),
    ("答案是什么", 0.1, 0.0),            # 答案 without a number is not the form
])
def test_math_reward_scores_correctness_plus_a_format_bonus(completion, bonus, reward):
    assert math_reward(completion, "12", format_bonus=bonus) == pytest.approx(reward)


def test_answer_format_is_a_stated_number():
    assert has_answer_format("所以答案是12。") and has_answer_format("\\boxed{3}")
    assert not has_answer_format("7+5=12") and not has_answer_format("\\boxed{}")


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0  # n = k: any correct
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)           # 1 - C(2,2)/C(4,2)
    assert pass_at_k(5, 0, 2) == 0.0


# ----------------------------------------------------------------------------- problem files

@pytest.mark.skipif(not APE210K.exists(), reason="../shared/data is absent")
def test_every_ape210k_answer_parses_and_all_5000_problems_read():
    records = [json.loads(line) for line in APE210K.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 5000
    assert [r["ans"] for r in records if parse_value(r["ans"]) is None] == []
    problems = list(iter_problems(APE210K))
    assert len(problems) == 5000
    first = problems[0]
    assert first.question == "学校把135本练习本平均分给3个班，每班多少本？"
    assert (first.answer, first.id, first.equation) == ("45", "491547", "135/3")
    assert first.source == f"{APE210K}:1"
    assert len(list(iter_problems(APE210K, limit=7))) == 7


def test_generic_gsm8k_and_json_list_problems(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"question": "1+1=?", "answer": "2"},
        {"problem": "半个是多少？", "ans": 0.5, "id": 7},
        {"prompt": "Janet has 3 eggs and buys 4.", "answer": "3+4=7 eggs.\n#### 7"},
    ])
    a, b, c = iter_problems(path)
    assert (a.question, a.answer, a.source, a.id) == ("1+1=?", "2", f"{path}:1", None)
    assert (b.answer, b.id) == ("0.5", "7")
    assert c.answer == "7"
    listed = tmp_path / "p.json"
    listed.write_text('[\n  {"question": "a", "answer": "1"},\n  {"question": "b",\n'
                      '   "answer": "(1/3)"}\n]\n', encoding="utf-8")
    assert [(p.answer, p.source) for p in iter_problems(listed)] == [
        ("1", f"{listed}:2"), ("(1/3)", f"{listed}:3")]


@pytest.mark.parametrize("record,problem", [
    ({"question": "q"}, "no answer field"),
    ({"answer": "1"}, "no question field"),
    ({"question": "q", "answer": "十二"}, "the answer '十二' is not a number"),
    ({"question": "q", "answer": ""}, "'answer' is empty"),
    ({"question": ["q"], "answer": "1"}, "'question' is a list, not a string"),
    (["q", "1"], "expected a JSON object, found a list"),
])
def test_a_bad_problem_record_names_its_file_and_line(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer": "1"}] * 2 + [record])
    with pytest.raises(UserError, match=re.escape(f"{path}:3: {problem}")):
        list(iter_problems(path))


def test_skip_bad_counts_bad_problems_and_keeps_the_rest(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{not json\n{"question": "q"}\n'
                    '{"question": "r", "answer": "2"}\n', encoding="utf-8")
    bad = BadRecords()
    assert [p.answer for p in iter_problems(path, skip_bad=True, bad=bad)] == ["1", "2"]
    assert bad.count == 2 and bad.locations == [f"{path}:2", f"{path}:3"]


@pytest.mark.parametrize("source,message", [
    ("missing.jsonl", "no such file"), ("p.txt", "unsupported problem file"),
    ("builtin:nope", "no such built-in problem set"), ("builtin:arith-zh#dev", "no split 'dev'"),
])
def test_unusable_problem_sources_are_one_line_errors(tmp_path, source, message):
    (tmp_path / "p.txt").write_text("1+1\n", encoding="utf-8")
    source = source if source.startswith("builtin:") else str(tmp_path / source)
    with pytest.raises(UserError, match=message):
        list(iter_problems(source))


# ----------------------------------------------------------------------------- builtin:arith-zh

def template_patterns() -> dict[str, re.Pattern]:
    """Each template as a regex that reads (a, b) back out of a question; the other slots
    match only the generator's own words."""
    def one_of(words) -> str:
        return "|".join(map(re.escape, sorted(set(words), key=len, reverse=True)))

    slots = {"a": r"\d+", "b": r"\d+", "p": one_of(n for n, _ in NAMES), "q": one_of(n for n, _ in NAMES),
             "he": "他|她", "m": one_of([m for m, _ in ITEMS] + [s[0] for s in SCENES]),
             "o": one_of([o for _, o in ITEMS] + [s[1] for s in SCENES]),
             "place": one_of(s[2] for s in SCENES), "come": one_of(s[3] for s in SCENES),
             "go": one_of(s[4] for s in SCENES), "ask": one_of(ASK)}
    out = {}
    for key, _, text in TEMPLATES:
        pattern, seen = re.escape(text), set()
        for name in re.findall(r"\{(\w+)\}", text):
            named = f"(?P={name})" if name in seen else f"(?P<{name}>{slots[name]})"
            pattern = pattern.replace(re.escape("{" + name + "}"), named, 1)
            seen.add(name)
        out[key] = re.compile(pattern)
    return out


def read_back(problem: Problem, patterns) -> tuple[str, int, int]:
    """(template key, a, b) of a generated problem; exactly one template must fit."""
    fits = [(key, m) for key, p in patterns.items() if (m := p.fullmatch(problem.question))]
    assert len(fits) == 1, problem.question
    key, m = fits[0]
    return key, int(m["a"]), int(m["b"])


def test_arithmetic_problems_are_correct_and_never_negative():
    patterns, ops = template_patterns(), {key: op for key, op, _ in TEMPLATES}
    names, objects = {n for n, _ in NAMES}, {o for _, o in ITEMS} | {s[1] for s in SCENES}
    for split, size in ARITH_SIZES.items():
        problems = arithmetic_problems(split)
        assert len(problems) == size
        for i, p in enumerate(problems):
            key, a, b = read_back(p, patterns)
            expected = a + b if ops[key] == "+" else a - b
            assert 1 <= a <= 20 and 1 <= b <= 20 and expected >= 0
            assert (p.answer, p.equation) == (str(expected), f"{a}{ops[key]}{b}")
            assert p.source == f"builtin:arith-zh#{split}:{i + 1}"
        assert {n for n in names if any(n in p.question for p in problems)} == names
        if split == "train":
            assert {o for o in objects if any(o in p.question for p in problems)} == objects


def test_arithmetic_splits_never_share_a_problem():
    patterns = template_patterns()
    triples = {split: {read_back(p, patterns) for seed in (0, 1)
                       for p in arithmetic_problems(split, seed=seed)} for split in ARITH_SIZES}
    assert not triples["train"] & triples["val"]
    assert not triples["train"] & triples["test"]
    assert not triples["val"] & triples["test"]
    assert len(triples["test"]) > 250  # held-out problems are mostly distinct, not a few repeated


def test_arithmetic_problems_are_a_pure_function_of_split_and_seed():
    assert arithmetic_problems("test", seed=3) == arithmetic_problems("test", seed=3)
    assert arithmetic_problems("test", seed=3) != arithmetic_problems("test", seed=4)
    assert arithmetic_problems("val", n=20) == arithmetic_problems("val")[:20]  # n only cuts
    assert list(iter_problems("builtin:arith-zh#test", limit=5)) == arithmetic_problems("test", 5)
    assert list(iter_problems("builtin:arith-zh")) == arithmetic_problems("train")


def test_arithmetic_answer_text_is_a_worked_equation_the_reward_accepts():
    p = Problem("小明有7个苹果，妈妈又给了他5个。小明现在有几个苹果？", "12", equation="7+5")
    assert arithmetic_answer_text(p) == "7+5=12，所以答案是12。"
    assert arithmetic_answer_text(Problem("q", "(1/3)")) == "答案是(1/3)。"
    for problem in arithmetic_problems("test"):
        assert math_reward(arithmetic_answer_text(problem), problem.answer, 0.5) == 1.5


def test_arith_zh_is_a_conversation_source():
    conversations = list(iter_conversations("builtin:arith-zh#test"))
    problems = arithmetic_problems("test")
    assert len(conversations) == 300
    c, p = conversations[0], problems[0]
    assert c.messages == [{"role": "user", "content": p.question},
                          {"role": "assistant", "content": arithmetic_answer_text(p)}]
    assert c.source == "builtin:arith-zh#test:1"
    assert len(list(iter_conversations("builtin:arith-zh"))) == 5000
    assert detect_format("builtin:arith-zh#val") == "prompt-answer"
    with pytest.raises(UserError, match="no split 'dev'"):
        list(iter_conversations("builtin:arith-zh#dev"))


# ----------------------------------------------------------------------------- the task

@pytest.mark.parametrize("spec,needle", [
    ({"k": 4}, "4 samples per problem need sampling"),
    ({"k": 2, "samples": 1, "generation": {"temperature": 0.7}}, r"samples \(1\) must be at least k \(2\)"),
    ({"template": "no slot"}, "--template must contain {question}"),
    ({"limit": 0}, "--limit must be at least 1"),
    ({"k": 0}, "k must be at least 1"),
])
def test_math_settings_are_checked_with_one_clear_line(spec, needle):
    with pytest.raises(UserError, match=needle):
        task_options({"task": "math", "data": "x", **spec})


def test_math_options_keep_the_task_decoding_under_command_line_settings():
    _, opts = task_options({"task": "math", "data": "x", "k": 4,
                            "generation": {"temperature": 0.7}}, progress=False)
    assert isinstance(opts, MathOptions)
    assert (opts.generation.max_new_tokens, opts.generation.temperature, opts.n) == (64, 0.7, 4)


# What run_math reads of a model when generation is faked: its context length.
FAKE_MODEL = type("Model", (), {"config": type("Config", (), {"max_position_embeddings": 512})()})()


def fake_generation(replies: dict[str, list[str]]):
    """A stand-in for generate_answers: each prompt's replies, in turn, by the prompt's text."""
    def generate(model, tokenizer, prompts, cfg, **kwargs):
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            key = next(q for q in replies if q in text)
            out.append(Completion(replies[key].pop(0), [], "stop", len(ids)))
        return out
    return generate


def test_run_math_scores_accuracy_pass_at_k_and_missing_answers(tmp_path, monkeypatch, tiny_tokenizer):
    data = write_jsonl(tmp_path / "p.jsonl", [{"question": "甲题", "answer": "12"},
                                              {"question": "乙题", "answer": "(1/3)"}])
    monkeypatch.setattr(math_task, "generate_answers", fake_generation({
        "甲题": ["答案是12。", "答案是11。", "不知道", "7+5=12"],
        "乙题": ["答案：0.5", "约0.33", "答案是0.3", "没有"]}))
    opts = MathOptions(str(data), k=2, samples=4, progress=False,
                       generation=GenerationConfig(temperature=0.7, max_new_tokens=8))
    result = run_math(FAKE_MODEL, tiny_tokenizer, opts)
    assert result.metrics["accuracy"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert result.metrics["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2)) / 2)
    assert result.metrics["no_answer"] == pytest.approx(2 / 8)
    assert result.metrics["answer_format"] == pytest.approx(4 / 8)
    assert result.metrics["n"] == 2 and list(result.rows[0]) == result.columns
    first = result.examples[0]
    assert (first["predicted"], first["correct"], first["n_correct"]) == ("12", True, 2)
    assert first["predicted_all"] == ["12", "11", None, "12"]
    assert result.settings["k"] == 2 and result.settings["temperature"] == 0.7


def test_run_math_takes_problems_in_memory(monkeypatch, tiny_tokenizer):
    monkeypatch.setattr(math_task, "generate_answers", fake_generation({"甲题": ["答案是12。"]}))
    problems = [Problem("甲题", "12", "held.jsonl:4"), Problem("乙题", "1", "held.jsonl:9")]
    result = run_math(FAKE_MODEL, tiny_tokenizer, MathOptions(problems, limit=1, progress=False))
    assert result.metrics["accuracy"] == 1.0 and result.metrics["n"] == 1
    assert result.data == "2 problems from held.jsonl:4"


def test_math_task_runs_through_the_engine_on_a_chat_run(chat_run, tmp_path):
    from babyllama.eval.report import write_result
    from babyllama.run import Run

    run = Run(chat_run)
    data = write_jsonl(tmp_path / "sums.jsonl", [{"question": f"{a}+1", "answer": str(a + 1)}
                                                 for a in range(5)])
    _, opts = task_options({"task": "math", "data": str(data), "limit": 3,
                            "generation": {"max_new_tokens": 8}}, chat=True, progress=False)
    result = run_math(run.load_model(), run.load_tokenizer(), opts)
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and result.metrics["n"] == 3
    assert len(result.examples) == 3
    assert all(e["finish_reason"] in ("stop", "length") for e in result.examples)
    md = write_result(result, tmp_path / "run", "math-sums")
    assert "| problems | accuracy |" in md.read_text(encoding="utf-8")


def test_math_task_samples_k_answers_reproducibly_through_the_engine(chat_run, tmp_path):
    from babyllama.run import Run

    run = Run(chat_run)
    model, tokenizer = run.load_model(), run.load_tokenizer()
    data = write_jsonl(tmp_path / "sums.jsonl", [{"question": f"{a}+2", "answer": str(a + 2)}
                                                 for a in range(3)])
    _, opts = task_options({"task": "math", "data": str(data), "k": 2, "batch_size": 3,
                            "generation": {"max_new_tokens": 6, "temperature": 1.0}},
                           chat=True, progress=False)
    first, again = run_math(model, tokenizer, opts), run_math(model, tokenizer, opts)
    assert 0.0 <= first.metrics["pass@2"] <= 1.0 and first.rows[0]["samples"] == 2
    assert all(len(e["answers"]) == 2 for e in first.examples)
    assert [e["answers"] for e in first.examples] == [e["answers"] for e in again.examples]
