"""The `math` task and the checks behind verifiable rewards: find the final answer in a model's
text, compare it with the reference, and score a run on a set of word problems.

    extract_answer(text)            the final answer a text states ("12", "(1/3)", "-3", "25%")
    parse_value(answer)             its exact value, a Fraction (data/problems.py's answer_value)
    answers_match(pred, reference)  equal values (the rule below)
    math_reward(completion, answer, format_bonus)   the RL reward of one completion
    run_math(model, tokenizer, MathOptions)         accuracy / pass@k on a problem set

Which number is the answer (`extract_answer`), first rule that finds one:
1. the last `\\boxed{...}` (the convention of math RL write-ups since Hendrycks et al. 2021, MATH);
2. the number right after the last answer statement: "答案是12", "答案为12", "答案：12",
   "最终答案是12", "the answer is 12", "answer: 12", GSM8K's "#### 12";
3. otherwise the last number of the text (a worked "7+5=12" ends with its result).
Numbers are written as in Ape210K: "1,000" (returned as "1000"), "-3", "3.5", "25%", "1/3",
"(1/3)", "2(1/3)" (a mixed number, 2 + 1/3), LaTeX "\\frac{1}{3}" (returned as "(1/3)");
full-width digits and signs ("１２", "％", "／") are read as ASCII. A minus sign right after a
digit or ")" is subtraction, not a sign ("5-3" ends with 3). Chinese numerals ("十二") are not
read.

When answers match (`answers_match`): the exact values are equal (Fractions: "(1/2)", "0.5"
and "50%" are one value), or one side is a decimal with at least 2 decimal places that is the
other correctly rounded to those places ("0.33" and "(1/3)", "33.33%" and "(1/3)"; not "0.3").
Ape210K's references are exact (on its 5,000-problem validation set every answer but one
equals the value of its equation), so the rounding rule only forgives a model that writes a
repeating decimal to 2 or more places; there is no relative tolerance, which would accept a
wrong large integer (100009 for 100000 at 1e-4).

The reward (`math_reward`): 1.0 when the extracted answer matches, else 0.0; plus
`format_bonus` when the completion states its answer in the expected form (`has_answer_format`:
an answer statement or \\boxed{} with a number, rule 1 or 2 above), whether or not the number is
right, so a policy that cannot yet solve a problem still learns the form that makes its
answers checkable (the "format reward" of DeepSeek-R1, Guo et al. 2025).

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): n answers are
sampled per problem (n = `samples`, default k), c of them correct; the unbiased estimate of
the chance that at least one of k draws is correct is 1 - C(n-c, k) / C(n, k), averaged over
problems. With n = k it is the share of problems with any correct answer. `accuracy` is the
mean of c / n (the pass@1 estimate; with greedy decoding, k = 1, exact-match accuracy).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from fractions import Fraction
from math import comb

from babyllama.data.problems import Problem, answer_value, iter_problems, normalize_math
from babyllama.errors import UserError
from babyllama.eval.prompting import generate_answers, question_prompt_ids
from babyllama.eval.report import EvalResult
from babyllama.eval.scoring import base_model
from babyllama.infer.config import GenerationConfig, changed_settings, decoding_defaults

# ----------------------------------------------------------------------------- answers

# A number as Ape210K writes one; a sign only where it cannot be subtraction.
_NUMBER = (r"(?:(?<![\d.)A-Za-z])-)?"
           r"(?:\d+\(\d+/\d+\)"                               # mixed number 2(1/3)
           r"|\(\d+(?:\.\d+)?/\d+(?:\.\d+)?\)"                # fraction in parentheses (1/3)
           r"|\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?)"              # 12, 3.5, 1/3
           r"%?")
NUMBER = re.compile(_NUMBER)
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
FRAC = re.compile(r"\\d?frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\}")
# An answer statement: the number that follows is the stated answer.
STATEMENT = re.compile(r"(?:(?:最终|最后的?)?答案\s*(?:应该|应)?\s*(?:是|为)?\s*[:：=]?"
                       r"|(?i:(?:final\s+)?answer\s*(?:is|:|=)|####))\s*\$?\s*(" + _NUMBER + ")")
ROUNDED_MIN_PLACES = 2


def _prepare(text: str) -> str:
    text = normalize_math(text)
    text = re.sub(r"(?<=[\d)])\s+(?=-)", "", text)  # "10 - 3": subtraction, not a -3
    return FRAC.sub(r"(\1/\2)", text.replace("\\%", "%"))


def extract_answer(text: str) -> str | None:
    """The final answer stated in `text` (rules in the module docstring), or None."""
    text = _prepare(text)
    boxed = BOXED.findall(text)
    if boxed:
        numbers = NUMBER.findall(boxed[-1])
        if numbers:
            return numbers[-1]
    stated = STATEMENT.findall(text)
    if stated:
        return stated[-1]
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def has_answer_format(text: str) -> bool:
    """Whether the text states its answer in the expected form: "答案是N", "答案：N", "the
    answer is N", "#### N" or \\boxed{N}, N a number."""
    text = _prepare(text)
    return bool(STATEMENT.search(text) or any(NUMBER.search(b) for b in BOXED.findall(text)))


def parse_value(answer: str) -> Fraction | None:
    """The exact value of an answer: "(1/3)" -> 1/3, "25%" -> 1/4, "2(1/3)" -> 7/3, "3.5" ->
    7/2, Ape210K's expression answers evaluated ("808-432" -> 376); None if not a number."""
    return answer_value(answer)


def _places(answer: str) -> tuple[int, Fraction] | None:
    """(decimal places, half a unit in the last place) of a decimal such as "0.33" or
    "33.33%", or None for any other form."""
    m = re.fullmatch(r"-?\d+\.(\d+)(%?)", normalize_math(answer).strip().rstrip("。"))
    if m is None:
        return None
    places = len(m.group(1))
    return places, Fraction(1, 2 * 10 ** places) / (100 if m.group(2) else 1)


def answers_match(predicted: str | None, reference: str) -> bool:
    """Equal values, or one side the other correctly rounded to >= 2 decimal places."""
    if predicted is None:
        return False
    p, r = parse_value(predicted), parse_value(reference)
    if p is None or r is None:
        return False
    if p == r:
        return True
    for written in (predicted, reference):
        rounded = _places(written)
        if rounded is not None and rounded[0] >= ROUNDED_MIN_PLACES and abs(p - r) <= rounded[1]:
            return True
    return False


def math_reward(completion: str, answer: str, format_bonus: float = 0.0) -> float:
    """1.0 for a correct final answer, else 0.0; plus `format_bonus` when the completion states
    its answer in the expected form (right or wrong)."""
    correct = 1.0 if answers_match(extract_answer(completion), answer) else 0.0
    return correct + (format_bonus if format_bonus and has_answer_format(completion) else 0.0)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021's unbiased estimate of pass@k from n samples of which c are correct."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


# ----------------------------------------------------------------------------- the task

DEFAULT_TEMPLATE = "{question}"
# Greedy, as every eval answer; 64 tokens hold a worked equation and "所以答案是N。".
MATH_DECODING = dict(max_new_tokens=64)


@dataclass
class MathOptions:
    data: str | list[Problem]          # problems: .jsonl/.json (Ape210K, GSM8K, {question, answer}),
                                       # builtin:arith-zh#test, or Problems in memory (a
                                       # trainer's held-out share)
    template: str = DEFAULT_TEMPLATE   # the prompt; {question} is replaced by the problem
    chat: bool = False                 # the prompt is a user message of the chat template
    generation: GenerationConfig = field(
        default_factory=lambda: decoding_defaults("eval-generation", **MATH_DECODING))
    k: int = 1                         # pass@k
    samples: int | None = None         # answers drawn per problem, n >= k (default: k)
    seed: int = 0                      # sampling seed when generation.seed is not set
    limit: int | None = None           # the first N problems only
    batch_size: int = 16
    progress: bool = True

    @property
    def n(self) -> int:
        return self.samples if self.samples is not None else self.k

    def check(self) -> None:
        """Every option problem, before the model loads or the data is read."""
        if "{question}" not in self.template:
            raise UserError(f"--template must contain {{question}} (where the problem goes), "
                            f"got {self.template!r}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.k < 1:
            raise UserError(f"k must be at least 1, got {self.k}")
        if self.n < self.k:
            raise UserError(f"samples ({self.n}) must be at least k ({self.k})")
        self.generation.check()
        if self.generation.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1 to generate an answer")
        if self.n > 1 and (self.generation.greedy or self.generation.num_beams > 1):
            raise UserError(f"{self.n} samples per problem need sampling: set a temperature above "
                            f"0 and num_beams 1 (greedy answers are all the same)")


def run_math(model, tokenizer, opts: MathOptions) -> EvalResult:
    """Answer every problem (opts.n times), extract and check the final answers."""
    opts.check()
    problems, data = read_problems(opts)
    cfg = opts.generation
    if not cfg.greedy and cfg.seed is None:
        cfg = dataclasses.replace(cfg, seed=opts.seed)  # a sampled score is reproducible too
    context = base_model(model).config.max_position_embeddings
    prompts = [prompt_ids(tokenizer, opts, p, context) for p in problems]
    n = opts.n
    # A prompt's n copies stay adjacent through generate_answers' (stable) length sort, and a
    # batch of a multiple of n rows holds them together: n rows of one random stream.
    answers = generate_answers(model, tokenizer, [ids for ids in prompts for _ in range(n)], cfg,
                               chat=opts.chat, batch_size=max(n, opts.batch_size // n * n),
                               desc="math", progress=opts.progress)
    examples, stats = [], Stats()
    for i, problem in enumerate(problems):
        examples.append(stats.add(problem, answers[i * n:(i + 1) * n], opts.k))
    metrics, row = stats.summary(opts.k, n)
    return EvalResult("math", data, metrics, list(row), [row],
                      settings=settings(opts, cfg), examples=examples)


def read_problems(opts: MathOptions) -> tuple[list[Problem], str]:
    """(the first `limit` problems, what the report calls the data)."""
    if isinstance(opts.data, list):
        problems = opts.data[:opts.limit]
        data = f"{len(opts.data)} problems" + (f" from {problems[0].source}" if problems else "")
    else:
        problems, data = list(iter_problems(opts.data, limit=opts.limit)), str(opts.data)
    if not problems:
        raise UserError(f"{data}: no problems")
    return problems, data


def prompt_ids(tokenizer, opts: MathOptions, problem: Problem, context: int) -> list[int]:
    ids = question_prompt_ids(tokenizer, [], opts.template.replace("{question}", problem.question),
                              chat=opts.chat)
    if len(ids) >= context and opts.generation.truncate != "left":
        raise UserError(f"{problem.source}: the prompt has {len(ids)} tokens; the model's context "
                        f"is {context} (use --truncate-left to drop its oldest tokens)")
    return ids


@dataclass
class Stats:
    """Running totals of the task over problems."""

    problems: int = 0
    accuracy: float = 0.0      # sum over problems of c / n
    pass_k: float = 0.0        # sum over problems of pass@k
    answers: int = 0
    no_answer: int = 0
    stated: int = 0            # answers in the expected form (has_answer_format)
    cut: int = 0               # answers that hit max_new_tokens

    def add(self, problem: Problem, completions: list, k: int) -> dict:
        """Count one problem's completions; returns its record for the examples file."""
        texts = [c.text.strip() for c in completions]
        predicted = [extract_answer(t) for t in texts]
        correct = [answers_match(p, problem.answer) for p in predicted]
        n, c = len(texts), sum(correct)
        self.problems += 1
        self.accuracy += c / n
        self.pass_k += pass_at_k(n, c, k)
        self.answers += n
        self.no_answer += sum(p is None for p in predicted)
        self.stated += sum(has_answer_format(t) for t in texts)
        self.cut += sum(a.finish_reason == "length" for a in completions)
        record = {"where": problem.source, "id": problem.id, "question": problem.question,
                  "reference": problem.answer, "predicted": predicted[0], "correct": correct[0],
                  "answer": texts[0], "finish_reason": completions[0].finish_reason}
        if n > 1:
            record.update(n_correct=c, predicted_all=predicted, answers=texts)
        return record

    def summary(self, k: int, n: int) -> tuple[dict, dict]:
        metrics = {"accuracy": self.accuracy / self.problems,
                   "no_answer": self.no_answer / self.answers,
                   "answer_format": self.stated / self.answers,
                   "hit_length_limit": self.cut / self.answers,
                   "n": self.problems, "samples": n}
        row = {"problems": self.problems, "accuracy": metrics["accuracy"]}
        if k > 1 or n > 1:
            metrics[f"pass@{k}"] = self.pass_k / self.problems
            row[f"pass@{k}"] = metrics[f"pass@{k}"]
            row["samples"] = n
        row.update({"no answer": metrics["no_answer"], "answer format": metrics["answer_format"],
                    "cut at max_new_tokens": metrics["hit_length_limit"]})
        return metrics, row


def settings(opts: MathOptions, cfg: GenerationConfig) -> dict:
    out: dict = {"chat": opts.chat, "k": opts.k, "samples": opts.n}
    if opts.template != DEFAULT_TEMPLATE:
        out["template"] = opts.template
    # Decoding: max_new_tokens always (it bounds the answers), the rest when not the default.
    out["max_new_tokens"] = cfg.max_new_tokens
    out.update(changed_settings(cfg, decoding_defaults("eval-generation", **MATH_DECODING)))
    out["limit"] = opts.limit
    return out
