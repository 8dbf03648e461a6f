"""Preference pairs for DPO and reward models: a prompt, a preferred and a dispreferred answer.

`iter_pairs(source)` yields one `PreferencePair` per record, whatever the layout; every format
is turned into the same normal form:

- `messages`: the conversation before the two answers, `{"role": "user"|"assistant",
  "content": str}` dicts with non-empty stripped contents, ending with a user turn (earlier
  exchanges are the history both answers continue);
- `chosen`, `rejected`: the two final assistant answers, non-empty, stripped, different;
- `system`: the system prompt or None; `source`: "file:line" of the record.

Formats (`PAIR_FORMATS`), detected per file from its first records (`format=` names one for
every file):

- prompt: `{prompt, chosen, rejected}` with string answers, optional `system`. `question` is
  read as `prompt` (several Chinese DPO sets), `instruction` (+ `input`, joined by a newline)
  too (LLaMA-Factory's alpaca layout, with its optional `history: [[question, answer], ...]`);
  `response_chosen` / `response_rejected` as the answers.
- sharegpt: LLaMA-Factory's `{conversations: [{from, value}], chosen: {from, value},
  rejected: {from, value}}`: the history in `conversations` (human/gpt/system; role/content
  accepted too), optional top-level `system`; an answer may also be a plain string.
- openai: conversational message lists. Implicit prompt (Anthropic HH, TRL): `{chosen:
  [messages], rejected: [messages]}`, the same prefix then a different final assistant
  message. Explicit prompt (TRL): `{prompt: [messages], chosen: [one assistant message],
  rejected: [...]}`. A leading system message becomes `system`.

Role names: user/human, assistant/gpt/bot/model, system. Consecutive messages of one role are
merged with "\\n", as `data/conversations.py` does; a system message after the first turn is
an error.

Files: .jsonl, .json (a list; an object of lists is read as splits and `file.json#name` picks
one; an object holding `chosen` is one record; JSON lines under a .json name are read as
.jsonl), .gz of those, or a directory of such files. Every record is located by the line it
starts on, in .json files too. Files are read through `data/records.py` (UTF-8, BOM dropped).

Errors: a bad record raises `UserError("file:line: problem")`, or with `skip_bad=True` is
counted in a `BadRecords` and skipped. A file with no records, an undetectable file (the error
names the fields it saw), invalid JSON in a .json and an unknown `format=` raise `UserError`
whatever `skip_bad` says.

`build_pairs(pairs, tokenizer, max_len)` renders both sides with the tokenizer's chat template
into `PairExample`s: two `SFTExample`s that share every token up to the answer, masked on the
final answer and its turn-ending token only. A pair too long for `max_len` loses its oldest
exchanges, the same on both sides; one whose last user turn and longer answer cannot fit is
dropped and counted. An answer is never cut: a half answer would be compared with a whole one.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from babyllama.data.conversations import BadRecord, merge_turns
from babyllama.data.records import (BadRecords, Record, Reporter, Unreadable, file_kind, source_files,
                                    is_json, json_type, jsonl_records)
from babyllama.data.sft import SFTExample
from babyllama.errors import UserError
from babyllama.textfile import read_text
from babyllama.tokenizer.chat_template import encode_chat, fit_chat

PAIR_FORMATS = ("prompt", "sharegpt", "openai")
PAIR_SHAPES = {
    "prompt": "{prompt|question|instruction, chosen, rejected} with string answers",
    "sharegpt": "{conversations: [{from, value}], chosen: {from, value}, rejected: {from, value}}",
    "openai": "{chosen: [messages], rejected: [messages]} or {prompt: [messages], chosen, "
              "rejected}",
}

_KINDS = {".jsonl": "jsonl", ".json": "json"}
SUPPORTED = ".jsonl, .json (and .gz of those)"

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "bot": "assistant", "model": "assistant", "chatgpt": "assistant", "system": "system"}
_PROMPT_FIELDS = ("prompt", "question", "instruction")
_CHOSEN_FIELDS = ("chosen", "response_chosen")
_REJECTED_FIELDS = ("rejected", "response_rejected")

_PEEK = 20  # readable records a file's format is detected from


@dataclass
class PreferencePair:
    messages: list[dict]       # conversation before the answers, user/assistant, ends with user
    chosen: str                # the preferred assistant answer
    rejected: str              # the dispreferred one
    system: str | None = None  # system prompt
    source: str = ""           # "file:line" of the record

    def chosen_messages(self) -> list[dict]:
        """Template messages of the chosen side: [system] + messages + [assistant chosen]."""
        return self._with(self.chosen)

    def rejected_messages(self) -> list[dict]:
        """Template messages of the rejected side: [system] + messages + [assistant rejected]."""
        return self._with(self.rejected)

    def _with(self, answer: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.messages] + [{"role": "assistant", "content": answer}]


class BadPair(Exception):
    """One record is malformed; the message is the problem (the caller adds the location)."""


# ---------------------------------------------------------------------------------------------
# Reading pairs


def iter_pairs(source, format: str | None = None, *, skip_bad: bool = False,
               bad: BadRecords | None = None, system: str | None = None) -> Iterator[PreferencePair]:
    """Preference pairs of one source: a file, a directory of files, or `file.json#split`.

    `format` (one of PAIR_FORMATS) overrides detection for every file; `system` is the system
    prompt of pairs that have none. Raises UserError for an unknown format, a missing,
    unsupported, empty or undetectable file, invalid JSON in a .json file and, unless
    `skip_bad`, the first bad record ("file:line: problem"); with `skip_bad` bad records are
    counted in `bad`.
    """
    if format is not None and format not in PAIR_FORMATS:
        raise UserError(f"unknown preference format '{format}' (choose from: "
                        f"{', '.join(PAIR_FORMATS)})")
    report = Reporter(skip_bad, bad)
    for path, split in source_files(source, _KINDS, SUPPORTED):
        yield from _iter_file(path, split, format, report, system)


def _iter_file(path: Path, split: str | None, format: str | None, report: Reporter,
               system: str | None) -> Iterator[PreferencePair]:
    records = _records(path, split)
    first = _peek(records)
    if not first:
        raise UserError(f"{path}: no records (expected preference pairs: "
                        f"{'; '.join(f'{k} {v}' for k, v in PAIR_SHAPES.items())})")
    name = format or _detect(path, first)
    parse = _PARSERS[name]
    for record in chain(first, records):
        if isinstance(record.value, Unreadable):
            report(record.where, record.value.problem, record.value.reason)
            continue
        try:
            messages, chosen, rejected, own_system = parse(record.value)
        except BadPair as e:
            report(record.where, str(e))
            continue
        yield PreferencePair(messages, chosen, rejected, own_system or system, record.where)


def _peek(records: Iterator[Record]) -> list[Record]:
    """The first records of a stream, up to _PEEK readable ones (consumed: chain them back)."""
    first, n = [], 0
    for record in records:
        first.append(record)
        n += not isinstance(record.value, Unreadable)
        if n >= _PEEK:
            break
    return first


def _detect(path: Path, first: list[Record]) -> str:
    """The format of a file: that of its first record that shows one (a malformed first record
    does not hide the file's layout). UserError naming the first record's fields when none does."""
    readable = [r.value for r in first if not isinstance(r.value, Unreadable)]
    if not readable:
        # Nothing to detect from: every record is reported as unreadable, whatever the format.
        return PAIR_FORMATS[0]
    name = next((n for n in map(_format_of, readable) if n is not None), None)
    if name is not None:
        return name
    record = readable[0]
    seen = (f"first record's fields: {', '.join(map(str, list(record)[:12])) or 'none'}"
            if isinstance(record, dict) else f"first record is {json_type(record)}")
    known = "; ".join(f"{k} {v}" for k, v in PAIR_SHAPES.items())
    raise UserError(f"{path}: cannot tell the preference format ({seen}); known formats: {known}")


def _format_of(record) -> str | None:
    """The format one record is in, or None."""
    if not isinstance(record, dict):
        return None
    if "conversations" in record:
        return "sharegpt"
    if any(isinstance(record.get(k), list) for k in ("chosen", "prompt")):
        return "openai"  # message lists
    if set(record) & set(_PROMPT_FIELDS) and set(record) & set(_CHOSEN_FIELDS):
        return "prompt"
    return None


# ---------------------------------------------------------------------------------------------
# Files and records


def _records(path: Path, split: str | None) -> Iterator[Record]:
    if file_kind(path, _KINDS) == "jsonl":
        return jsonl_records(path)
    return _json_records(path, split)


def _json_records(path: Path, split: str | None) -> Iterator[Record]:
    """Records of a .json file, each located by the line its item starts on.

    The file is one value and is loaded whole (large sets belong in .jsonl); json.loads keeps
    no positions, so the lines come from walking the text again with raw_decode."""
    text = read_text(path)
    if not text.strip():
        return iter(())
    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and split is None and is_json(text.split("\n", 1)[0]):
            return jsonl_records(path)  # JSON lines under a .json name
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    return (Record(f"{path}:{line}", item, line, line)
            for items, starts in _lists(path, text, top, split)
            for line, item in zip(starts, items))


def _lists(path: Path, text: str, top, split: str | None) -> list[tuple[list, list[int]]]:
    """(records, line of each) of every record list of a loaded .json value."""
    if split is not None:
        if not isinstance(top, dict):
            raise UserError(f"{path}#{split}: the file holds {json_type(top)}; #NAME selects a "
                            f"key of an object")
        if split not in top:
            raise UserError(f"{path}#{split}: no key '{split}' (keys: {', '.join(map(str, top))})")
        if not isinstance(top[split], list):
            raise UserError(f"{path}#{split}: '{split}' is {json_type(top[split])}, not a list")
        return [(top[split], _item_lines(text, _value_starts(text)[split], len(top[split])))]
    if isinstance(top, list):
        return [(top, _item_lines(text, text.index("["), len(top)))]
    if isinstance(top, dict) and "chosen" not in top and top and \
            all(isinstance(v, list) for v in top.values()):
        starts = _value_starts(text)  # splits: {"train": [...], "test": [...]}
        return [(items, _item_lines(text, starts[key], len(items))) for key, items in top.items()]
    if isinstance(top, dict) and top:
        return [([top], [1 + text.count("\n", 0, text.index("{"))])]  # one record
    if isinstance(top, dict):
        return []  # {}: no records
    raise UserError(f"{path}:1: expected a list of preference pairs or an object, found "
                    f"{json_type(top)}")


_DECODER = json.JSONDecoder()
_SPACE = " \t\r\n"


def _skip(text: str, pos: int, chars: str) -> int:
    while text[pos] in chars:
        pos += 1
    return pos


def _item_lines(text: str, pos: int, n: int) -> list[int]:
    """The line each of the `n` items of the JSON list opening at text[pos] starts on."""
    line, pos = 1 + text.count("\n", 0, pos), pos + 1
    out = []
    for _ in range(n):
        start, pos = pos, _skip(text, pos, _SPACE + ",")
        line += text.count("\n", start, pos)
        out.append(line)
        start = pos
        _, pos = _DECODER.raw_decode(text, pos)
        line += text.count("\n", start, pos)
    return out


def _value_starts(text: str) -> dict[str, int]:
    """Where each value of the (valid) top-level JSON object in `text` starts, by key."""
    out = {}
    pos = text.index("{") + 1
    while True:
        pos = _skip(text, pos, _SPACE + ",")
        if text[pos] == "}":
            return out
        key, pos = _DECODER.raw_decode(text, pos)
        pos = _skip(text, pos, _SPACE + ":")
        out[key] = pos  # a repeated key: json.loads keeps the last value, and so does this
        _, pos = _DECODER.raw_decode(text, pos)


# ---------------------------------------------------------------------------------------------
# Parsers: record -> (messages, chosen, rejected, system), raising BadPair

Parsed = tuple[list[dict], str, str, "str | None"]
Turn = tuple[str, str]  # (role, stripped content)


def _object(record) -> dict:
    if not isinstance(record, dict):
        raise BadPair(f"expected an object, found {json_type(record)}")
    return record


def _field(record: dict, names: tuple[str, ...]) -> str:
    """The first of `names` present in the record."""
    name = next((n for n in names if n in record), None)
    if name is None:
        fields = ", ".join(map(str, list(record)[:10])) or "none"
        wanted = "' or '".join(names)
        raise BadPair(f"no '{wanted}' field (fields: {fields})")
    return name


def _string(value, name: str) -> str:
    """`value` stripped; BadPair when it is not a string."""
    if not isinstance(value, str):
        raise BadPair(f"'{name}' is {json_type(value)}, not a string")
    return value.strip()


def _system(record: dict) -> str | None:
    value = record.get("system")
    return (_string(value, "system") or None) if value is not None else None


def _answers(chosen: str, rejected: str) -> tuple[str, str]:
    """The two (stripped) answers, checked: non-empty and different."""
    if not chosen:
        raise BadPair("'chosen' is empty (an empty answer)")
    if not rejected:
        raise BadPair("'rejected' is empty (an empty answer)")
    if chosen == rejected:
        raise BadPair("'chosen' and 'rejected' are the same answer (nothing to prefer)")
    return chosen, rejected


def _message(m, label: str) -> Turn:
    """(role, stripped content) of one message, `{role|from, content|value}`; `label` names
    it in errors ("message 2 of 'chosen'")."""
    if not isinstance(m, dict):
        raise BadPair(f"{label} is {json_type(m)}, not an object")
    role_key = next((k for k in ("role", "from") if k in m), None)
    if role_key is None:
        raise BadPair(f"{label} has no 'role' (or 'from')")
    content_key = next((k for k in ("content", "value") if k in m), None)
    if content_key is None:
        raise BadPair(f"{label} has no 'content' (or 'value')")
    role = m[role_key]
    known = _ROLES.get(role.strip().lower()) if isinstance(role, str) else None
    if known is None:
        raise BadPair(f"{label} has unknown role {role!r} (known: {', '.join(_ROLES)})")
    content = m[content_key]
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)  # OpenAI's multi-part text content
    if not isinstance(content, str):
        raise BadPair(f"{label} content is {json_type(content)}, not a string")
    return known, content.strip()


def _messages(items, name: str) -> list[Turn]:
    if not isinstance(items, list):
        raise BadPair(f"'{name}' is {json_type(items)}, not a list of messages")
    return [_message(m, f"message {i} of '{name}'") for i, m in enumerate(items, 1)]


def _history(turns: list[Turn], name: str) -> tuple[list[dict], str | None]:
    """(messages, system) of the turns before the answers (`name`: the field they come from):
    a leading system prompt, the rest merged by role and ending with a user turn."""
    try:
        system, messages = merge_turns(turns, f"'{name}' message")
    except BadRecord as e:
        raise BadPair(str(e)) from None
    if not messages:
        raise BadPair(f"no user turn in '{name}' before the answers")
    if messages[-1]["role"] != "user":
        raise BadPair(f"'{name}' ends with an assistant turn; the turn before the answers must "
                      f"be the user's")
    return messages, system


def _pairs_history(value) -> list[Turn]:
    """LLaMA-Factory's alpaca `history: [[question, answer], ...]` as turns."""
    if not isinstance(value, list):
        raise BadPair(f"'history' is {json_type(value)}, not a list")
    turns = []
    for i, pair in enumerate(value, 1):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise BadPair(f"history item {i} is not a [question, answer] pair")
        turns += [("user", _string(pair[0], f"history item {i}")),
                  ("assistant", _string(pair[1], f"history item {i}"))]
    return turns


def _parse_prompt(record) -> Parsed:
    record = _object(record)
    name = _field(record, _PROMPT_FIELDS)
    prompt = _string(record[name], name)
    if name == "instruction" and record.get("input") is not None:
        extra = _string(record["input"], "input")
        prompt = f"{prompt}\n{extra}" if prompt and extra else prompt or extra
    if not prompt:
        raise BadPair(f"'{name}' is empty")
    turns = _pairs_history(record["history"]) if record.get("history") else []
    messages, _ = _history(turns + [("user", prompt)], "history")
    chosen, rejected = (_string(record[k], k) for k in (_field(record, _CHOSEN_FIELDS),
                                                       _field(record, _REJECTED_FIELDS)))
    return messages, *_answers(chosen, rejected), _system(record)


def _sharegpt_answer(record: dict, name: str) -> str:
    """An answer of the sharegpt layout: `{from: gpt, value}` (or a plain string)."""
    value = record[_field(record, (name,))]
    if isinstance(value, str):
        return value.strip()
    role, content = _message(value, f"'{name}'")
    if role != "assistant":
        raise BadPair(f"'{name}' is from {value.get('from', value.get('role'))!r}, not the "
                      f"assistant")
    return content


def _parse_sharegpt(record) -> Parsed:
    record = _object(record)
    turns = _messages(record[_field(record, ("conversations",))], "conversations")
    messages, system = _history(turns, "conversations")
    chosen, rejected = _answers(_sharegpt_answer(record, "chosen"),
                                _sharegpt_answer(record, "rejected"))
    return messages, chosen, rejected, system or _system(record)


def _parse_openai(record) -> Parsed:
    record = _object(record)
    chosen = _messages(record[_field(record, ("chosen",))], "chosen")
    rejected = _messages(record[_field(record, ("rejected",))], "rejected")
    if "prompt" in record:  # explicit prompt: each side holds only its answer
        prompt = record["prompt"]
        turns = [("user", _string(prompt, "prompt"))] if isinstance(prompt, str) else \
            _messages(prompt, "prompt")
        for name, side in (("chosen", chosen), ("rejected", rejected)):
            if len(side) != 1:
                raise BadPair(f"'{name}' holds {len(side)} messages; after a 'prompt' it must "
                              f"be the one assistant answer")
        messages, system = _history(turns, "prompt")
    else:  # implicit prompt: both sides repeat the conversation before their answer
        if len(chosen) != len(rejected) or chosen[:-1] != rejected[:-1]:
            at = next((i for i, (a, b) in enumerate(zip(chosen, rejected), 1) if a != b),
                      min(len(chosen), len(rejected)))
            raise BadPair(f"'chosen' and 'rejected' differ before their last message (at "
                          f"message {at}; they hold {len(chosen)} and {len(rejected)})")
        messages, system = _history(chosen[:-1], "chosen")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[-1][0] != "assistant":
            raise BadPair(f"'{name}' does not end with an assistant message")
    return messages, *_answers(chosen[-1][1], rejected[-1][1]), system or _system(record)


_PARSERS: dict[str, Callable[[Any], Parsed]] = {
    "prompt": _parse_prompt, "sharegpt": _parse_sharegpt, "openai": _parse_openai}


# ---------------------------------------------------------------------------------------------
# Token examples


@dataclass
class PairExample:
    chosen: SFTExample    # ids of [system] + history + chosen; mask on the chosen answer only
    rejected: SFTExample  # the same prompt tokens, then the rejected answer
    source: str = ""      # "file:line" of the pair

    @property
    def prompt_len(self) -> int:
        """Tokens both sides share before the answer (where the first target is)."""
        return int(np.argmax(self.chosen.mask))


@dataclass
class PairStats:
    pairs: int = 0
    examples: int = 0
    truncated: int = 0      # pairs that lost older turns to fit
    turns_dropped: int = 0  # messages removed to fit, over all pairs
    dropped: int = 0
    reasons: Counter = field(default_factory=Counter)  # why pairs were dropped

    def summary(self) -> str:
        s = f"{self.pairs:,} pairs -> {self.examples:,} examples"
        if self.truncated:
            s += f"; {self.truncated:,} truncated ({self.turns_dropped:,} older turns removed)"
        if self.dropped:
            why = ", ".join(f"{n:,} {reason}" for reason, n in self.reasons.most_common())
            s += f"; {self.dropped:,} dropped ({why})"
        return s


def build_pairs(pairs, tokenizer, max_len: int, *,
                template: str | None = None) -> tuple[list[PairExample], PairStats]:
    """Encode preference pairs into examples of at most `max_len` tokens per side.

    Each side is `encode_chat` of its template messages (`template`: None means the
    tokenizer's chat template); the mask is True on the final answer and its turn-ending token
    (the last `{% generation %}` block) only, never on the first token. Both sides keep the same
    history: the one with the longer answer is fitted (`fit_chat`, oldest exchanges first) and
    the other takes the same messages. A pair whose last user turn and longer answer exceed
    `max_len` is dropped and counted. Raises UserError when the template renders the prompt
    differently for the two answers (no shared prefix to compare them on).
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (one input and one target), got {max_len}")
    stats = PairStats()
    examples = []
    for pair in pairs:
        stats.pairs += 1
        fitted = _fit_pair(pair, tokenizer, max_len, template)
        if fitted is None:
            stats.dropped += 1
            stats.reasons[f"last exchange longer than {max_len} tokens"] += 1
            continue
        example, turns_dropped = fitted
        stats.truncated += turns_dropped > 0
        stats.turns_dropped += turns_dropped
        examples.append(example)
        stats.examples += 1
    return examples, stats


def _fit_pair(pair: PreferencePair, tokenizer, max_len: int, template):
    """(PairExample, messages dropped) within max_len, or None when the pair cannot fit."""
    sides = {"chosen": pair.chosen_messages(), "rejected": pair.rejected_messages()}
    full = {k: encode_chat(tokenizer, msgs, template=template) for k, msgs in sides.items()}
    # Both sides encode the same prompt to the same tokens (encode_chat cuts at the answer), so
    # the side with more tokens is the longer one whatever history is kept: fit that one.
    longer = max(full, key=lambda k: len(full[k].ids))
    shorter = "rejected" if longer == "chosen" else "chosen"
    encs, dropped = full, 0
    if len(full[longer].ids) > max_len:
        fitted = fit_chat(tokenizer, sides[longer], max_len, template=template)
        if fitted is None:
            return None
        enc, dropped, _ = fitted
        n_system = 1 if pair.system else 0
        kept = sides[shorter][:n_system] + sides[shorter][n_system + dropped:]
        encs = {longer: enc, shorter: encode_chat(tokenizer, kept, template=template)}
    chosen, rejected = _example(encs["chosen"]), _example(encs["rejected"])
    start = encs["chosen"].spans[-1][0]
    if encs["rejected"].spans[-1][0] != start or \
            not np.array_equal(chosen.ids[:start], rejected.ids[:start]):
        raise UserError(f"{pair.source or 'a preference pair'}: the chat template renders the "
                        f"prompt differently before the chosen and the rejected answer")
    return PairExample(chosen, rejected, pair.source), dropped


def _example(enc) -> SFTExample:
    """The encoding as an SFTExample trained on its last generation block only."""
    ids = np.asarray(enc.ids, dtype=np.int32)
    mask = np.zeros(len(ids), dtype=bool)
    start, end = enc.spans[-1]
    mask[start:end] = True
    mask[0] = False  # the first token has nothing to be predicted from
    return SFTExample(ids, mask)
