"""ROUGE on a summarization set: the model writes a summary of each source text and ROUGE-1,
ROUGE-2 and ROUGE-L (precision, recall, F1) compare it with the reference.

    rouge_n(pred, ref, n), rouge_l(pred, ref)  one example's Score, on token lists; the same
                                               numbers as Google's rouge-score package
    read_summaries(path)                       (source, reference) examples from .tsv (CSL),
                                               .csv, .jsonl, .json or LCSTS's .txt
    run_rouge(model, tokenizer, RougeOptions)  generate, score, EvalResult

Chinese is scored at character level by default: rouge-score's own tokenizer keeps only
[a-z0-9] and so drops every Chinese character, and word segmentation (jieba, `level="word"`)
makes the score depend on the segmenter's dictionary. Characters are what CSL's and LCSTS's
baselines report. The headline numbers are the mean over examples of each example's
precision, recall and F (how rouge-score users report "ROUGE-1 F"; it is not F of the mean
precision and recall); the babyllama write-up's ROUGE-1 F 0.567 on CSL uses this definition.
"""

from __future__ import annotations

import json
import logging
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from babyllama.data.records import (Record, csv_rows, first_unreadable, is_lcsts_text, json_list_records,
                                    lcsts_records, tsv_rows)
from babyllama.errors import UserError, where
from babyllama.eval.prompting import generate_answers, question_prompt_ids
from babyllama.eval.report import EvalResult
from babyllama.eval.scoring import base_model
from babyllama.infer.config import GenerationConfig, changed_settings, decoding_defaults

LEVELS = ("char", "word")
DEFAULT_TEMPLATE = "{text}\n摘要："
# Column / key names tried in order when none is given (CSL's abstract -> title included).
SOURCE_NAMES = ("text", "content", "source", "document", "article", "abstract", "input")
REFERENCE_NAMES = ("summary", "title", "target", "reference", "output")
ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


# ----------------------------------------------------------------------------- the metric

class Score(NamedTuple):
    precision: float
    recall: float
    fmeasure: float


def score(overlap: int, predicted: int, reference: int) -> Score:
    # max(.., 1): an empty side scores 0 rather than dividing by zero (as rouge-score).
    p, r = overlap / max(predicted, 1), overlap / max(reference, 1)
    return Score(p, r, 2 * p * r / (p + r) if p + r > 0 else 0.0)


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(prediction_tokens: list[str], reference_tokens: list[str], n: int) -> Score:
    """Clipped n-gram overlap: an n-gram counts at most as often as it occurs in each side."""
    if n < 1:
        raise ValueError(f"rouge_n needs n >= 1, got {n}")
    pred, ref = ngrams(prediction_tokens, n), ngrams(reference_tokens, n)
    return score(sum((pred & ref).values()), sum(pred.values()), sum(ref.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction_tokens: list[str], reference_tokens: list[str]) -> Score:
    """Longest common subsequence over the whole texts (rouge-score's rougeL, not rougeLsum)."""
    lcs = lcs_length(prediction_tokens, reference_tokens)
    return score(lcs, len(prediction_tokens), len(reference_tokens))


def rouge_scores(prediction_tokens: list[str], reference_tokens: list[str]) -> dict[str, Score]:
    return {"rouge1": rouge_n(prediction_tokens, reference_tokens, 1),
            "rouge2": rouge_n(prediction_tokens, reference_tokens, 2),
            "rougeL": rouge_l(prediction_tokens, reference_tokens)}


def jieba_cut():
    try:
        import jieba
    except ImportError:
        raise UserError("--rouge-level word needs jieba: pip install jieba") from None
    jieba.setLogLevel(logging.WARNING)  # else it logs "Building prefix dict..." on first use
    return jieba.lcut


def rouge_tokens(text: str, level: str = "char") -> list[str]:
    """char: every non-whitespace character; word: jieba's words. ASCII letters lowercased."""
    text = text.translate(ASCII_LOWER)
    if level == "char":
        return [c for c in text if not c.isspace()]
    if level == "word":
        return [w for w in jieba_cut()(text) if w.strip()]
    raise UserError(f"unknown ROUGE level {level!r}; use one of {', '.join(LEVELS)}")


# ----------------------------------------------------------------------------- the data

@dataclass
class Example:
    source: str
    reference: str
    where: str  # "file:line", for messages and the examples file


def example(source, reference, at: str) -> Example:
    for value, what in ((source, "source text"), (reference, "reference summary")):
        if not isinstance(value, str):
            raise UserError(f"{at}: the {what} is not a string: {json.dumps(value)[:60]}")
        if not value.strip():
            raise UserError(f"{at}: the {what} is empty")
    return Example(source.strip(), reference.strip(), at)


def shown(names: list[str]) -> str:
    # A headerless TSV's "names" are data: long abstracts would swamp the message.
    return ", ".join(repr(n if len(n) <= 24 else n[:24] + "...") for n in names)


def pick_columns(names: list[str], source_field: str | None, target_field: str | None,
                 at: str) -> tuple[int, int]:
    """Indexes of the source and reference among `names` (a header, or a first object's keys):
    by name (case-insensitive) or 0-based index; otherwise the first default name present."""
    lower = [str(n).strip().lower() for n in names]

    def given(name: str, role: str) -> int:
        if name.strip().lower() in lower:
            return lower.index(name.strip().lower())
        if name.isdigit() and int(name) < len(names):
            return int(name)
        raise UserError(f"{at}: no {role} column {name!r}; columns: {shown(names)}")

    def default(candidates: tuple[str, ...], other: int | None, role: str) -> int:
        for c in candidates:
            if c in lower and lower.index(c) != other:
                return lower.index(c)
        raise UserError(f"{at}: no {role} column among {', '.join(candidates)}; columns: "
                        f"{shown(names)} (name the {role} field)")

    si = given(source_field, "source") if source_field is not None else None
    ti = given(target_field, "reference") if target_field is not None else None
    si = si if si is not None else default(SOURCE_NAMES, ti, "source")
    ti = ti if ti is not None else default(REFERENCE_NAMES, si, "reference")
    if si == ti:
        raise UserError(f"{at}: the source and the reference are the same column {names[si]!r}")
    return si, ti


def is_header(row: list[str], source_field: str | None, target_field: str | None) -> bool:
    """A TSV's first row is a header when it holds the given field names (or, when none are
    given, a default source name and a default reference name)."""
    lower = {f.strip().lower() for f in row}
    names = [f for f in (source_field, target_field) if f is not None and not f.isdigit()]
    if names:
        return all(n.strip().lower() in lower for n in names)
    return bool(lower & set(SOURCE_NAMES)) and bool(lower & set(REFERENCE_NAMES))


def tsv_examples(path: Path, source_field: str | None,
                 target_field: str | None) -> list[Example]:
    """Examples of a .tsv: with a header row (see `is_header`), or without one CSL's
    `prompt \t abstract \t title` or `text \t summary`; columns by name or 0-based number."""
    rows = [r for r in first_unreadable(tsv_rows(path, whole=True))]
    if not rows:
        return []
    first = rows[0].value
    at = rows[0].where
    if is_header(first, source_field, target_field):
        si, ti = pick_columns(first, source_field, target_field, at)
        rows = rows[1:]
    else:
        for name in (source_field, target_field):
            if name is not None and not name.isdigit():
                raise UserError(f"{at}: no column {name!r} in the first row (a header needs "
                                f"it; else give 0-based column numbers); fields: {shown(first)}")
        layout = {2: (0, 1), 3: (1, 2)}.get(len(first))
        if layout is None and (source_field is None or target_field is None):
            raise UserError(f"{at}: expected 2 (text, summary) or 3 (prompt, text, summary) "
                            f"tab-separated fields, found {len(first)}")
        si = int(source_field) if source_field is not None else layout[0]
        ti = int(target_field) if target_field is not None else layout[1]
        if max(si, ti) >= len(first):
            raise UserError(f"{at}: no column {max(si, ti)} (0-based): the line has "
                            f"{len(first)} tab-separated fields")
        if si == ti:
            raise UserError(f"{at}: the source and the reference are the same column {si}")
    out = []
    for row in rows:
        if len(row.value) != len(first):
            raise UserError(f"{row.where}: expected {len(first)} tab-separated fields, "
                            f"found {len(row.value)}")
        out.append(example(row.value[si], row.value[ti], row.where))
    return out


def csv_examples(path: Path, source_field: str | None,
                 target_field: str | None) -> list[Example]:
    """Examples of a .csv with a header; a row is named by the line it ends on."""
    def malformed(record) -> str:
        return f"malformed CSV ({record.value.problem.removeprefix('malformed CSV: ')})"

    out, header, si, ti = [], None, 0, 0
    for row in first_unreadable(csv_rows(path, whole=True), malformed):
        at = where(path, row.end)
        if header is None:
            header = row.value
            si, ti = pick_columns(header, source_field, target_field, at)
        elif len(row.value) != len(header):
            raise UserError(f"{at}: expected {len(header)} comma-separated fields, "
                            f"found {len(row.value)}")
        else:
            out.append(example(row.value[si], row.value[ti], at))
    return out


def object_examples(records: list[Record], source_field: str | None,
                    target_field: str | None) -> list[Example]:
    """Examples of JSON objects; the first object's keys name the fields of all."""
    out, keys = [], None
    for record in records:
        obj, at = record.value, record.where
        if not isinstance(obj, dict):
            raise UserError(f"{at}: expected a JSON object, found {type(obj).__name__}")
        if keys is None:
            names = list(obj)
            si, ti = pick_columns(names, source_field, target_field, at)
            keys = names[si], names[ti]
        for key in keys:
            if key not in obj:
                raise UserError(f"{at}: no field {key!r}; fields: {shown(list(obj))}")
        out.append(example(obj[keys[0]], obj[keys[1]], at))
    return out


def read_summaries(path: str | Path, source_field: str | None = None,
                   target_field: str | None = None) -> list[Example]:
    """Every (source, reference) example of a summarization file; see the module docstring
    for the formats. `source_field` / `target_field`: column or key names, or 0-based column
    numbers as strings ("1"). The files are read by `babyllama.data.records`; every problem
    raises UserError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        out = tsv_examples(path, source_field, target_field)
    elif suffix == ".csv":
        out = csv_examples(path, source_field, target_field)
    elif suffix in (".jsonl", ".json"):
        out = object_examples(json_list_records(path), source_field, target_field)
    elif suffix == ".txt":
        if not is_lcsts_text(path):
            raise UserError(f"{path}: no <summary> tag: a .txt file is read as LCSTS "
                            "(<summary> / <short_text> blocks)")
        out = [example(r.value["text"], r.value["summary"], r.where)
               for r in first_unreadable(lcsts_records(path))]
    else:
        raise UserError(f"{path}: unknown summarization format: give .tsv, .csv, .jsonl, .json "
                        "or LCSTS's .txt (<summary> / <short_text> blocks)")
    if not out:
        raise UserError(f"{path}: no examples")
    return out


# ----------------------------------------------------------------------------- the task

@dataclass
class RougeOptions:
    data: str
    template: str = DEFAULT_TEMPLATE   # the prompt; {text} is replaced by the source
    chat: bool = False                 # the filled template is a user message of the chat template
    level: str = "char"                # char | word (jieba)
    source_field: str | None = None    # column / key name, or 0-based column number
    target_field: str | None = None
    limit: int | None = None           # the first N examples only
    batch_size: int = 16
    generation: GenerationConfig = field(default_factory=lambda: decoding_defaults("eval-rouge"))
    progress: bool = True

    def check(self) -> None:
        """Every option problem, before the model loads or the data is read."""
        if self.level not in LEVELS:
            raise UserError(f"--rouge-level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if "{text}" not in self.template:
            raise UserError(f"--template must contain {{text}} (where the source goes), "
                            f"got {self.template!r}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.generation.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1 to generate a summary")
        self.generation.check()
        if self.level == "word":
            jieba_cut()


def fit_prompt(tokenizer, template: str, source: str, *, chat: bool,
               budget: int) -> tuple[list[int], bool]:
    """The prompt's ids for `source`, its end cut off until the prompt has at most `budget`
    tokens (the template is kept whole: it says what to do). Returns (ids, shortened)."""
    def encode(text: str) -> list[int]:
        return question_prompt_ids(tokenizer, [], template.replace("{text}", text), chat=chat)

    ids = encode(source)
    if len(ids) <= budget:
        return ids, False
    lo, hi = 0, len(source)  # source[:lo] fits (the caller checked the template alone), [:hi] not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(encode(source[:mid])) <= budget else (lo, mid)
    return encode(source[:lo]), True


def summary_line(text: str) -> str:
    # A summary is one line: what a base model writes after it is the next document.
    return text.strip().split("\n", 1)[0].strip()


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run_rouge(model, tokenizer, opts: RougeOptions) -> EvalResult:
    """Summarize every example (greedy by default), keep the answer's first line, score it."""
    opts.check()
    examples = read_summaries(opts.data, opts.source_field, opts.target_field)[:opts.limit]
    context = base_model(model).config.max_position_embeddings
    cfg = opts.generation
    budget = context - cfg.max_new_tokens
    alone = len(question_prompt_ids(tokenizer, [], opts.template.replace("{text}", ""), chat=opts.chat))
    if alone > budget:
        raise UserError(f"the prompt template alone takes {alone} tokens: with max_new_tokens "
                        f"{cfg.max_new_tokens} it does not fit the model's context ({context})")
    fitted = [fit_prompt(tokenizer, opts.template, ex.source, chat=opts.chat, budget=budget)
              for ex in examples]
    answers = generate_answers(model, tokenizer, [ids for ids, _ in fitted], cfg,
                               chat=opts.chat, batch_size=opts.batch_size, desc="rouge",
                               progress=opts.progress)

    records, scores, lengths = [], [], []
    for ex, answer, (_, shortened) in zip(examples, answers, fitted):
        prediction = summary_line(answer.text)
        pred, ref = rouge_tokens(prediction, opts.level), rouge_tokens(ex.reference, opts.level)
        s = rouge_scores(pred, ref)
        scores.append(s)
        lengths.append((len(pred), len(ref)))
        records.append({"where": ex.where, "source": ex.source[:200], "reference": ex.reference,
                        "prediction": prediction, **{f"{k}_f": v.fmeasure for k, v in s.items()},
                        "finish_reason": answer.finish_reason,
                        "prompt_tokens": answer.prompt_tokens, "shortened": shortened})

    metrics = {f"{name}_{kind}": mean([getattr(s[name], attr) for s in scores])
               for kind, attr in (("f", "fmeasure"), ("p", "precision"), ("r", "recall"))
               for name in ("rouge1", "rouge2", "rougeL")}
    n_short = sum(shortened for _, shortened in fitted)
    metrics.update(pred_len=mean([p for p, _ in lengths]), ref_len=mean([r for _, r in lengths]),
                   n=len(examples), shortened=n_short)
    row = {"examples": len(examples), "ROUGE-1 F": metrics["rouge1_f"],
           "ROUGE-2 F": metrics["rouge2_f"], "ROUGE-L F": metrics["rougeL_f"],
           "ROUGE-1 P": metrics["rouge1_p"], "ROUGE-1 R": metrics["rouge1_r"],
           "mean length": metrics["pred_len"], "reference length": metrics["ref_len"],
           "shortened": n_short}
    return EvalResult("rouge", str(opts.data), metrics, list(row), [row],
                      settings=settings(opts, n_short), examples=records)


def settings(opts: RougeOptions, shortened: int) -> dict:
    out: dict = {"template": opts.template, "chat": opts.chat, "level": opts.level}
    out.update({k: v for k, v in (("source_field", opts.source_field),
                                  ("target_field", opts.target_field)) if v is not None})
    # Decoding: max_new_tokens always (it bounds the summaries), the rest when not the default.
    out["max_new_tokens"] = opts.generation.max_new_tokens
    out.update(changed_settings(opts.generation, decoding_defaults("eval-rouge")))
    out.update(limit=opts.limit, shortened=shortened)
    return out
