"""Math word problems with a checkable final answer: reading problem sets, and a built-in
synthetic set of Chinese arithmetic word problems (the data of reinforcement learning with
verifiable rewards and of the `math` evaluation task).

    iter_problems(source)             a Problem per record of a file, or of `builtin:arith-zh`
    arithmetic_problems(split, n)     the built-in set: a pure function of (split, seed)
    arithmetic_answer_text(problem)   its SFT target: "7+5=12，所以答案是12。"
    answer_value(answer)              the exact value of a reference answer (Fraction), or None

Files: .jsonl or .json (a list of objects), .gz of either, one problem per record:
- Ape210K (Zhao et al. 2020, "Ape210K: A Large-Scale and Template-Rich Dataset of Math Word
  Problems"): `{id, original_text, segmented_text, ans, equation}`; question = original_text,
  answer = ans, equation = equation without its "x=".
- generic: the question in `question`, `problem` or `prompt`; the answer in `answer` or `ans`
  (a string or a JSON number); an optional `id` and `equation`.
- GSM8K (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"): `answer` is a
  worked solution ending in "#### 72"; the final answer is what follows the last "####".
A record without a question, without an answer, or whose answer is not a number is bad:
`UserError("file:line: problem")`, or skipped and counted with `skip_bad` (see BadRecords).

Answer forms (`answer_value`), as Ape210K writes them: integers "45", decimals "3.7",
fractions in parentheses "(11/20)", bare fractions "525/7", percentages "72%" (= 18/25),
mixed numbers "23(1/3)" (= 23 + 1/3, not 23 x 1/3), negatives "-3"; and about 1% of its
answers are left as expressions ("808-432", "160/(1-20%)"), which are evaluated exactly (+ - *
/, parentheses, %). Thousands separators ("1,000"), full-width digits and signs ("１２", "％",
"／", "（１／３）"), spaces and a final "。" are accepted. Values are `fractions.Fraction`, so
(1/3) is exactly one third and 0.1 + 0.2 is exactly 0.3.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

from babyllama.data.readers import BUILTIN_PREFIX
from babyllama.data.records import (BadRecords, Record, Reporter, Unreadable, file_kind,
                                    item_lines, json_or_lines, json_type, jsonl_records)
from babyllama.errors import UserError


@dataclass
class Problem:
    question: str               # the problem text given to the model
    answer: str                 # the reference final answer as written: "68", "(1/3)", "25%"
    source: str = ""            # "file:line" or "builtin:arith-zh#test:17"
    id: str | None = None
    equation: str | None = None  # the worked equation when the set has one: "7+5", "135/3"


# ---------------------------------------------------------------------------------------------
# Answer values

# Full-width forms (what Chinese input methods type) and the math signs, to ASCII.
_WIDE = str.maketrans("０１２３４５６７８９．％／（）＋－−＊×÷＝", "0123456789.%/()+--**/=")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TOKEN = re.compile(r"\d+(?:\.\d+)?|\.\d+|[-+*/()%]")


def normalize_math(text: str) -> str:
    """Full-width digits and signs as ASCII (×, ÷ and − too); thousands commas removed."""
    return _THOUSANDS.sub("", text.translate(_WIDE))


def answer_value(answer: str) -> Fraction | None:
    """The exact value of an answer written in one of the forms of the module docstring, or
    None when it is not a number (text, an empty string, division by zero)."""
    text = normalize_math(str(answer)).strip().rstrip("。.")
    if re.search(r"[\d.]\s+[\d.]", text):  # "1 2" is two numbers, not twelve
        return None
    text = re.sub(r"\s+", "", text)
    tokens = _TOKEN.findall(text)
    if not tokens or "".join(tokens) != text:  # something that is not a number or a sign
        return None
    try:
        parser = _Expression(tokens)
        value = parser.sum()
    except (ValueError, ZeroDivisionError, RecursionError):  # RecursionError: "((((...", deep
        return None
    return value if parser.done else None


class _Expression:
    """Recursive descent over answer tokens, with Ape210K's mixed numbers:

        sum     := product (("+" | "-") product)*
        product := signed (("*" | "/") signed)*
        signed  := ("-" | "+") signed | percent
        percent := atom "%"*
        atom    := NUMBER "(" NUMBER "/" NUMBER ")"     a mixed number: 2(1/3) = 7/3
                 | NUMBER | "(" sum ")"
    """

    def __init__(self, tokens: list[str]):
        self.tokens, self.i = tokens, 0

    @property
    def done(self) -> bool:
        return self.i == len(self.tokens)

    def peek(self, k: int = 0) -> str | None:
        return self.tokens[self.i + k] if self.i + k < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or expected is not None and token != expected:
            raise ValueError(f"expected {expected or 'more'}")
        self.i += 1
        return token

    def sum(self) -> Fraction:
        value = self.product()
        while self.peek() in ("+", "-"):
            value = value + self.product() if self.take() == "+" else value - self.product()
        return value

    def product(self) -> Fraction:
        value = self.signed()
        while self.peek() in ("*", "/"):
            value = value * self.signed() if self.take() == "*" else value / self.signed()
        return value

    def signed(self) -> Fraction:
        if self.peek() in ("-", "+"):
            return -self.signed() if self.take() == "-" else self.signed()
        value = self.atom()
        while self.peek() == "%":
            self.take()
            value /= 100
        return value

    def atom(self) -> Fraction:
        token = self.take()
        if token == "(":
            value = self.sum()
            self.take(")")
            return value
        if not _is_number(token):
            raise ValueError(f"unexpected {token!r}")
        value = Fraction(token)
        # "2(1/3)": a whole number right before a parenthesised fraction is a mixed number.
        if token.isdigit() and self.peek() == "(" and _is_number(self.peek(1) or "") \
                and self.peek(2) == "/" and _is_number(self.peek(3) or "") and self.peek(4) == ")":
            self.i += 5
            value += Fraction(self.tokens[self.i - 4]) / Fraction(self.tokens[self.i - 2])
        return value


def _is_number(token: str) -> bool:
    return token[:1].isdigit() or token[:1] == "."


# ---------------------------------------------------------------------------------------------
# Reading problem sets

QUESTION_FIELDS = ("question", "problem", "prompt", "original_text")
ANSWER_FIELDS = ("answer", "ans")
_KINDS = {".jsonl": "jsonl", ".json": "json"}
SUPPORTED = ".jsonl, .json (a list of objects), and .gz of either"


class BadProblem(Exception):
    """One record is not a problem; the message says why (the caller adds file:line)."""


def iter_problems(source, *, skip_bad: bool = False, bad: BadRecords | None = None,
                  limit: int | None = None, seed: int = 0, answers: bool = True) -> Iterator[Problem]:
    """The problems of a file (see the module docstring) or of `builtin:arith-zh[#split]`
    (#train when no split is named; `seed` draws its names and objects), at most `limit`.
    `answers=False` reads prompts whose answer is optional and any text (`answer` ""): the
    prompts of a reward that does not check a number (a reward model, a Python function).

    Raises UserError for a missing or unsupported file and, unless `skip_bad`, the first bad
    record; with `skip_bad` bad records are counted in `bad`."""
    if limit is not None and limit < 1:
        return
    if isinstance(source, str) and source.startswith(BUILTIN_PREFIX):
        yield from _builtin_problems(source, limit, seed)
        return
    report = Reporter(skip_bad, bad)
    n = 0
    for record in _records(Path(source)):
        if isinstance(record.value, Unreadable):
            report(record.where, record.value.problem, record.value.reason)
            continue
        try:
            problem = _problem(record.value, record.where, answers)
        except BadProblem as e:
            report(record.where, str(e))
            continue
        yield problem
        n += 1
        if limit is not None and n >= limit:
            return


def _records(path: Path) -> Iterator[Record]:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    kind = file_kind(path, _KINDS) if path.is_file() else None
    if kind is None:
        raise UserError(f"{path}: unsupported problem file (supported: {SUPPORTED})")
    if kind == "jsonl":
        return jsonl_records(path)
    return _json_list(path)


def _json_list(path: Path) -> Iterator[Record]:
    shape, top = json_or_lines(path)
    if shape == "jsonl":  # JSON lines under a .json name
        yield from jsonl_records(path)
        return
    if top is None:
        return
    if not isinstance(top, list):
        raise UserError(f"{path}:1: expected a JSON list of problems, found {json_type(top)}")
    for line, item in zip(item_lines(path, top), top):
        yield Record(f"{path}:{line}", item, line, line)


def _problem(record, where: str, answers: bool = True) -> Problem:
    if not isinstance(record, dict):
        raise BadProblem(f"expected a JSON object, found {json_type(record)}")
    question = _text(record, QUESTION_FIELDS, "question")
    if not answers:
        has = any(n in record for n in ANSWER_FIELDS)
        answer = _text(record, ANSWER_FIELDS, "answer") if has and record[next(
            n for n in ANSWER_FIELDS if n in record)] not in ("", None) else ""
        return Problem(question, answer, where, None if record.get("id") is None else str(record["id"]))
    answer = _text(record, ANSWER_FIELDS, "answer")
    if "####" in answer:  # GSM8K: a worked solution, then "#### 72"
        answer = answer.rsplit("####", 1)[1].strip()
    if answer_value(answer) is None:
        raise BadProblem(f"the answer {answer[:40]!r} is not a number")
    equation = record.get("equation")
    equation = equation.strip().removeprefix("x=").strip() if isinstance(equation, str) else None
    pid = record.get("id")
    return Problem(question, answer, where, None if pid is None else str(pid), equation or None)


def _text(record: dict, names: tuple[str, ...], what: str) -> str:
    """The first of `names` in the record, as a non-empty string (JSON numbers as written)."""
    name = next((n for n in names if n in record), None)
    if name is None:
        fields = ", ".join(map(str, list(record)[:10])) or "none"
        raise BadProblem(f"no {what} field ({' or '.join(names)}; fields: {fields})")
    value = record[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = json.dumps(value)
    if not isinstance(value, str):
        raise BadProblem(f"'{name}' is {json_type(value)}, not a string")
    if not value.strip():
        raise BadProblem(f"'{name}' is empty")
    return value.strip()


# ---------------------------------------------------------------------------------------------
# The built-in synthetic set: builtin:arith-zh

ARITH_NAME = "arith-zh"
ARITH_SOURCE = BUILTIN_PREFIX + ARITH_NAME
ARITH_SIZES = {"train": 5000, "val": 200, "test": 300}
# Share (of 100 hash buckets) of the (template, a, op, b) problems in each held-out split; the
# rest is train. ~3,050 distinct problems at operands 1-20: ~300 test, ~240 val.
_HELD_OUT = {"test": range(0, 10), "val": range(10, 18)}

# (name, pronoun): the pronoun of "妈妈又给了他".
NAMES = (("小明", "他"), ("小红", "她"), ("小华", "他"), ("小刚", "他"), ("小丽", "她"),
         ("小军", "他"), ("小芳", "她"), ("小强", "他"), ("小兰", "她"), ("小东", "他"),
         ("乐乐", "他"), ("丽丽", "她"))
# (measure word, object): things a child owns, buys, gives away and loses.
ITEMS = (("个", "苹果"), ("本", "书"), ("支", "铅笔"), ("块", "糖"), ("个", "橘子"),
         ("张", "邮票"), ("个", "气球"), ("块", "饼干"), ("辆", "玩具车"), ("张", "卡片"),
         ("朵", "花"), ("颗", "弹珠"))
# (measure word, object, place, arrives, leaves): animals and cars that come and go.
SCENES = (("只", "小鸟", "树上", "飞来", "飞走"), ("条", "鱼", "池塘里", "游来", "游走"),
          ("辆", "汽车", "停车场里", "开来", "开走"), ("只", "鸭子", "河里", "游来", "游走"))
ASK = ("多少", "几")

# (key, operation, text): every template's answer is {a} op {b}; subtraction needs a >= b, so
# no answer is negative. {p}/{he}: a child and the pronoun; {q}: another child; {m}{o}: an
# item; {place}/{come}/{go}: a scene (a template with {place} draws from SCENES).
TEMPLATES = (
    ("gift", "+", "{p}有{a}{m}{o}，妈妈又给了{he}{b}{m}。{p}现在有{ask}{m}{o}？"),
    ("together", "+", "{p}有{a}{m}{o}，{q}有{b}{m}{o}。{p}和{q}一共有{ask}{m}{o}？"),
    ("buy", "+", "{p}昨天买了{a}{m}{o}，今天又买了{b}{m}。{p}两天一共买了{ask}{m}{o}？"),
    ("more-than", "+", "{q}有{a}{m}{o}，{p}比{q}多{b}{m}。{p}有{ask}{m}{o}？"),
    ("arrive", "+", "{place}有{a}{m}{o}，又{come}了{b}{m}。{place}现在有{ask}{m}{o}？"),
    ("give-away", "-", "{p}有{a}{m}{o}，送给{q}{b}{m}。{p}还剩{ask}{m}{o}？"),
    ("lose", "-", "{p}有{a}{m}{o}，不小心弄丢了{b}{m}。{p}还剩{ask}{m}{o}？"),
    ("compare", "-", "{p}有{a}{m}{o}，{q}有{b}{m}{o}。{p}比{q}多{ask}{m}{o}？"),
    ("fewer-than", "-", "{p}有{a}{m}{o}，{q}比{p}少{b}{m}。{q}有{ask}{m}{o}？"),
    ("leave", "-", "{place}有{a}{m}{o}，{go}了{b}{m}。{place}还剩{ask}{m}{o}？"),
)


def arithmetic_split(key: str, a: int, op: str, b: int) -> str:
    """The split a (template, a, op, b) problem belongs to, by a hash that does not depend on
    the seed or the operand range: no problem is ever in two splits, whatever the seed."""
    digest = hashlib.blake2b(f"{key}|{a}{op}{b}".encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 100
    return next((split for split, buckets in _HELD_OUT.items() if bucket in buckets), "train")


def arithmetic_problems(split: str = "train", n: int | None = None, seed: int = 0, *,
                        max_operand: int = 20) -> list[Problem]:
    """`n` (default ARITH_SIZES[split]) Chinese addition and subtraction word problems with
    operands 1..max_operand, a pure function of (split, seed, max_operand).

    Each split's distinct (template, a, op, b) problems are shuffled and dealt out, then
    reshuffled when all are used (train's 5,000 deal each of its ~2,500 about twice, with
    other names and objects); the first k problems do not depend on n."""
    if split not in ARITH_SIZES:
        raise UserError(f"{ARITH_SOURCE}#{split}: no such split (splits: {', '.join(ARITH_SIZES)})")
    if max_operand < 1:
        raise UserError(f"max_operand must be at least 1, got {max_operand}")
    n = ARITH_SIZES[split] if n is None else n
    pool = [(t, a, b) for t in TEMPLATES for a in range(1, max_operand + 1)
            for b in range(1, max_operand + 1)
            if not (t[1] == "-" and b > a) and arithmetic_split(t[0], a, t[1], b) == split]
    if not pool:
        raise UserError(f"{ARITH_SOURCE}#{split}: no problems with operands up to {max_operand}")
    rng = random.Random(f"{ARITH_NAME}/{split}/{seed}/{max_operand}")  # str seeds are stable
    out: list[Problem] = []
    order: list = []
    for i in range(n):
        if not order:
            order = rng.sample(pool, len(pool))
        (key, op, text), a, b = order.pop()
        answer = a + b if op == "+" else a - b
        out.append(Problem(_fill(text, a, b, rng), str(answer), f"{ARITH_SOURCE}#{split}:{i + 1}",
                           f"{ARITH_NAME}-{split}-{i + 1}", f"{a}{op}{b}"))
    return out


def _fill(text: str, a: int, b: int, rng: random.Random) -> str:
    (p, he), (q, _) = rng.sample(NAMES, 2)
    if "{place}" in text:
        m, o, place, come, go = rng.choice(SCENES)
    else:
        (m, o), place, come, go = rng.choice(ITEMS), "", "", ""
    return text.format(p=p, he=he, q=q, a=a, b=b, m=m, o=o, place=place, come=come, go=go,
                       ask=rng.choice(ASK))


def arithmetic_answer_text(problem: Problem) -> str:
    """The SFT target of a problem: its worked equation, then the answer in the form the
    `math` task and rewards look for ("答案是N"): "7+5=12，所以答案是12。"."""
    if problem.equation:
        return f"{problem.equation}={problem.answer}，所以答案是{problem.answer}。"
    return f"答案是{problem.answer}。"


def _builtin_problems(source: str, limit: int | None, seed: int) -> Iterator[Problem]:
    name, _, split = source[len(BUILTIN_PREFIX):].partition("#")
    if name != ARITH_NAME:
        raise UserError(f"{source}: no such built-in problem set (available: {ARITH_SOURCE})")
    split = split or "train"
    if split not in ARITH_SIZES:  # checked here too: the message names the source as given
        raise UserError(f"{source}: no split '{split}' (splits: {', '.join(ARITH_SIZES)})")
    n = ARITH_SIZES[split] if limit is None else min(limit, ARITH_SIZES[split])
    yield from arithmetic_problems(split, n, seed)
