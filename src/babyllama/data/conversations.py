"""Read SFT conversations out of the dataset layouts people actually have.

`iter_conversations(source)` yields one `Conversation` per record, whatever the layout: every
format below is turned into the same normal form, `messages` alternating between "user" and
"assistant" (non-empty strings, ending with an assistant turn), plus an optional `system`
prompt and an optional reference `document` (a 资料 passage, as grounded-dialogue data has).

Formats are the entries of one registry, `REGISTRY`: a name, the shape it reads, a `detect`
test on a file's first records and a `parse` function from one record to the normal form.
Detection tries the entries in order on the first records of each file (or `format=` names
one). Adding a format is adding an entry and its parse function:

- openai: `{messages: [{role, content}]}`; a leading system message becomes `.system`. Role
  names: user/human/usr, assistant/gpt/bot/model/sys (the dialogue system of task-oriented
  sets such as CrossWOZ), system; `speaker` for `role` and `text` for `content` too.
- sharegpt: `{conversations: [{from, value}]}` (human/gpt/...; role/content also accepted),
  optional top-level `system`.
- alpaca: `{instruction, input, output}` (user = instruction + "\\n" + input), optional
  `system` and `history: [[q, a], ...]` (Alpaca, BELLE, LLaMA-Factory); BELLE's multi-turn
  `instruction` ("Human:…\\nAssistant:…\\nHuman:…\\nAssistant:") is split into its turns.
- firefly: `{conversation: [{human, assistant}, ...]}`, optional `system` (Firefly, MOSS).
- moss: MOSS-003-SFT as fnlp ships it (moss-003-sft-data, with or without tools):
  `{meta_instruction, chat: {turn_1: {Human, MOSS, ...}, ...}}`, turns in number order
  (turn_10 after turn_2); user = Human without `<|Human|>:` and `<eoh>`, assistant = MOSS
  without `<|MOSS|>:` and `<eom>`, `meta_instruction` the system prompt. The Inner Thoughts,
  Commands and Tool Responses (`<|Results|>:`) of a turn are not part of the normal form and
  are dropped; a turn that used a tool keeps its Human and MOSS text, so its answer may refer
  to results the model is not shown. MOSS-002's `plain_text`, `[Human]: … <eoh> [MOSS]: …
  <eoa> …`, is read too (text before the first `[Human]:` as the system prompt, unless a
  `meta_instruction` is there).
- kdconv: `{name, messages: [{message, attrs?}]}`: speakers alternate from the user; the
  knowledge in `attrs` becomes the document.
- babyllama-text: the babyllama write-up's `资料：…\\n\\n人类：…\\n\\n助手：…` (Human:/Assistant: too) in a `text`
  or `dialogue` field, the document in a `reference` field or the 资料 prefix (this reads
  RedGPT-Dataset-V1-CN as it is); in a .txt each conversation starts at a `资料：` line.
- llama2-text: `<s>Human: …\\n</s><s>Assistant: …\\n</s>` in a `text` field (FlagAlpha's
  Llama2-Chinese data) or a .txt in which each line that starts with `<s>` starts one.
- prompt-answer: single-turn fields or CSV columns, any case: the question in prompt,
  question, query, q, input or instruction; the answer in answer, response, output,
  completion, target or a, else in a reference answer (reference_answer, ref_answer,
  std_answer, standard_answer, gold_answer). Safety-Prompts (thu-coai) reads as it is: its
  .json files are objects of category lists of `{prompt, response, type}`, read as splits
  (`typical_safety_scenarios.json#Insult` picks one category).
- csl: CSL's TSV without header, `prompt \\t text \\t title`: a summarization pair.
- lcsts: `{summary, text}` or `{title, content}` (LCSTS-style news), or LCSTS's original
  PART_*.txt of <summary>/<short_text> blocks: a summarization pair.
- lccc: `dialogues` whose text is split into characters by spaces; the spaces are removed.
- dialogues: a JSON list of utterance lists (speakers alternate, first = user), a JSON object
  of such lists (splits), or .txt/.tsv lines of tab-separated utterances (LCCC's pair files).
- chatterbot: chatterbot-corpus YAML, `conversations: [[a, b, c, ...], ...]`; the built-in
  `builtin:chatterbot-zh` is its Chinese part.

Files (read by `data/records.py`): .jsonl, .json (a list; an object of lists is read as
splits, `file.json#train` picks one; an object keyed by ids, `{"11290": {...}, ...}`, is read
as its values; JSON lines in a .json file, as RedGPT ships them, are read as .jsonl), .csv
(with a header), .tsv, .txt, .yml/.yaml, and .gz of any of them; or a directory of such files.
`builtin:arith-zh` (`#train`, `#val`, `#test`) is generated, not read: each arithmetic word
problem of `data/problems.py` asked, and answered with its worked equation. So is
`builtin:reviews-zh` (same splits): each review of `data/reviews.py` asked about (好评 or
差评?) and, when it has a topic, asked for ("写一条关于酒店的好评。" -> the review).

Choices made once, here:
- Consecutive messages of the same role are merged into one, joined with "\\n" (a user who
  sends two messages in a row asked one question); contents are stripped of surrounding
  whitespace.
- A conversation that ends with a user turn after answered ones keeps its answered turns: the
  unanswered turn is dropped and counted in `Conversation.unanswered` (`BuildStats` reports
  it). Where speakers only alternate (kdconv, dialogues, lccc, chatterbot) an odd last
  utterance is normal and dropped without counting. A conversation with no answer at all is a
  bad record.
- `lccc` is detected, not only named: a `dialogues` file whose first records are >= 90%
  single-character tokens is read as `lccc`. Name `dialogues` to keep the spaces.
- Summarization pairs (csl, lcsts) become a question and an answer drawn from the templates in
  `sft_augment`, reproducible from `seed` (see there).

Bad records raise `UserError("file:line: problem")` (`file:record N` in a .json list), or with
`skip_bad=True` are counted in a `BadRecords`; records of an object keyed by ids written on one
line are located as `file:1 (id 10303)`. When no format fits a file, the error says what the
file holds: its first record's fields, an object keyed by ids and its values' fields (or their
types, when they are not records), one object's fields, or an empty object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator

from babyllama.data import sft_augment
from babyllama.data.builtin import BUILTIN_CONVERSATIONS, chatterbot_files
from babyllama.data.problems import ARITH_SOURCE, arithmetic_answer_text, iter_problems
from babyllama.data.readers import BUILTIN_PREFIX
from babyllama.data.records import (BadRecords, Record, Reporter, Unreadable, csv_rows, file_kind, source_files,
                                    id_records, json_or_lines, json_type, jsonl_records,
                                    keyed_by_id, lcsts_records, lines, load_json, tsv_rows,
                                    yaml_item_lines, yaml_value)
from babyllama.data.reviews import REVIEWS_ZH_SOURCE, review_exchanges, reviews_zh_split
from babyllama.errors import UserError


@dataclass
class Conversation:
    messages: list[dict]          # [{"role": "user"|"assistant", "content": str}, ...]
    system: str | None = None     # system prompt
    document: str | None = None   # reference passage (资料) the answer draws on
    source: str = ""              # "file:line" (or "file:record N") of the record
    unanswered: int = 0           # trailing user turns dropped: no reply to learn from

    def template_messages(self) -> list[dict]:
        """The messages as a chat template takes them: the system prompt first, if any."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.messages]


@dataclass
class Parsed:
    """What a format's parse function makes of one record."""

    messages: list[dict]
    system: str | None = None
    document: str | None = None
    unanswered: int = 0


@dataclass
class Sample:
    """What detection sees of a file: its kind ("jsonl", "json", "csv", "tsv", "txt", "yml")
    and its first readable records (at least one)."""

    kind: str
    records: list

    @property
    def first(self):
        return self.records[0]

    @property
    def keys(self) -> set[str]:
        """The first record's field names, lower-cased (empty if it is not an object)."""
        return {str(k).lower() for k in self.first} if isinstance(self.first, dict) else set()


@dataclass(frozen=True)
class Format:
    """One conversation format: `parse(record, seed) -> Parsed` raises `BadRecord`;
    `detect(sample)` says whether a file looks like this format (None: only by name);
    `starts_record(line)`, for .txt files whose records span lines, tells a record's first line."""

    name: str
    shape: str
    parse: Callable[[Any, int], Parsed]
    detect: Callable[[Sample], bool] | None = None
    starts_record: Callable[[str], Any] | None = None


class BadRecord(Exception):
    """One record is malformed; the message is the problem (the caller adds the location)."""


BUILTIN_CONVERSATION_FORMAT = "chatterbot"  # builtin:chatterbot-zh

_KINDS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".txt": "txt",
          ".yml": "yml", ".yaml": "yml"}
SUPPORTED = ".jsonl, .json, .csv, .tsv, .txt, .yml/.yaml (and .gz of those)"

_ROLES = {"user": "user", "human": "user", "usr": "user",
          "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
          "chatgpt": "assistant", "model": "assistant",
          # In task-oriented dialogue sets (CrossWOZ, RiSAWOZ, MultiWOZ) "sys" is the dialogue
          # system, the side that answers, not a system prompt.
          "sys": "assistant",
          "system": "system"}

# Single-turn field names, tried in order: the first question field and the first answer field
# present make the pair; a reference answer serves when no answer field is there.
PROMPT_FIELDS = ("prompt", "question", "query", "q", "input", "instruction")
ANSWER_FIELDS = ("answer", "response", "output", "completion", "target", "a")
REFERENCE_ANSWER_FIELDS = ("reference_answer", "ref_answer", "std_answer", "standard_answer",
                           "gold_answer")
# A TSV whose first row holds only these names has a header.
_COLUMN_NAMES = {*PROMPT_FIELDS, *ANSWER_FIELDS, *REFERENCE_ANSWER_FIELDS, "system", "text",
                 "summary", "content", "title", "abstract", "dialogue"}

_PEEK = 20  # records looked at to detect a format (and whether text is character-split)


# ---------------------------------------------------------------------------------------------
# Public entry points

def iter_conversations(source, format: str | None = None, *, skip_bad: bool = False,
                       bad: BadRecords | None = None, seed: int = 0,
                       system: str | None = None) -> Iterator[Conversation]:
    """Conversations of one source: a file, a directory, `file.json#split` or `builtin:NAME`.

    `format` overrides detection (it applies to every file of a directory). `system` is the
    system prompt of conversations that have none. `seed` drives the summarization templates.
    Raises UserError for an unknown format, an unreadable or undetectable file and, unless
    `skip_bad`, the first bad record; with `skip_bad` bad records are counted in `bad`.
    """
    if format is not None and format not in FORMATS:
        raise UserError(f"unknown conversation format '{format}' (choose from: "
                        f"{', '.join(FORMATS)})")
    report = Reporter(skip_bad, bad)
    if _is_arith(source):
        yield from _arith_conversations(source, seed, system)
        return
    if _is_reviews_zh(source):
        yield from _reviews_conversations(source, seed, system)
        return
    if isinstance(source, str) and source.startswith(BUILTIN_PREFIX):
        files = [(path, None) for path in _builtin_files(source)]
        format = BUILTIN_CONVERSATION_FORMAT  # the built-in set has one known layout
    else:
        files = source_files(source, _KINDS, SUPPORTED)
    for path, split in files:
        yield from _iter_file(path, split, format, report, seed, system)


def detect_format(path) -> str:
    """The format name of a file, from its extension and first records' fields.

    Raises UserError naming what it saw when no format fits.
    """
    if _is_arith(path) or _is_reviews_zh(path):
        return "prompt-answer"  # generated question / answer pairs
    if isinstance(path, str) and path.startswith(BUILTIN_PREFIX):
        _builtin_files(path)  # an unknown name or a missing package is an error here too
        return BUILTIN_CONVERSATION_FORMAT
    path, split = source_files(path, _KINDS, SUPPORTED)[0]  # a directory: its first file
    kind = _kind(path)
    first = _peek(_records(path, kind, split))
    for record in first:
        if isinstance(record.value, Unreadable):
            raise UserError(f"{record.where}: {record.value.problem}")
    return _detect(path, kind, first).name


# ---------------------------------------------------------------------------------------------
# Files and records

def _builtin_files(source: str) -> list[Path]:
    name = source[len(BUILTIN_PREFIX):]
    if name == "chatterbot-zh":
        return chatterbot_files(source, "chinese")
    known = ", ".join(f"builtin:{n}" for n in BUILTIN_CONVERSATIONS)
    raise UserError(f"{source}: no such built-in conversation set (available: {known})")


def _is_arith(source) -> bool:
    return isinstance(source, str) and source.partition("#")[0] == ARITH_SOURCE


def _arith_conversations(source: str, seed: int, system: str | None) -> Iterator[Conversation]:
    for problem in iter_problems(source, seed=seed):
        messages = [{"role": "user", "content": problem.question},
                    {"role": "assistant", "content": arithmetic_answer_text(problem)}]
        yield Conversation(messages, system, source=problem.source)


def _is_reviews_zh(source) -> bool:
    return isinstance(source, str) and source.partition("#")[0] == REVIEWS_ZH_SOURCE


def _reviews_conversations(source: str, seed: int, system: str | None) -> Iterator[Conversation]:
    for question, answer, where in review_exchanges(reviews_zh_split(source), seed, source):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        yield Conversation(messages, system, source=where)


def _kind(path: Path) -> str | None:
    return file_kind(path, _KINDS)


def _iter_file(path: Path, split: str | None, format: str | None, report: Reporter, seed: int,
               system: str | None) -> Iterator[Conversation]:
    kind = _kind(path)
    records = _records(path, kind, split)
    if format is None:
        first = _peek(records)
        if not any(_filled(record) for record in first):
            # Nothing readable: an empty file holds no conversations (the caller decides if
            # that is an error); unreadable lines are still reported.
            for record in first:
                if isinstance(record.value, Unreadable):
                    report(record.where, record.value.problem, record.value.reason)
            return
        fmt = _detect(path, kind, first)
        records = chain(first, records)
    else:
        fmt = FORMAT_BY_NAME[format]
    if kind == "txt":
        records = _txt_records(records, fmt)
    for record in records:
        if isinstance(record.value, Unreadable):
            report(record.where, record.value.problem, record.value.reason)
            continue
        try:
            parsed = fmt.parse(record.value, seed)
        except BadRecord as e:
            report(record.where, str(e))
            continue
        yield Conversation(parsed.messages, parsed.system or system, parsed.document or None,
                           record.where, parsed.unanswered)


def _records(path: Path, kind: str, split: str | None) -> Iterator[Record]:
    """The records of one file; .txt lines come raw (blank ones included)."""
    if split is not None and kind not in ("json", "yml"):
        raise UserError(f"{path}#{split}: '#{split}' selects a split of a .json or .yml file")
    if kind == "jsonl":
        return jsonl_records(path)
    if kind == "json":
        return _json_records(path, split)
    if kind == "yml":
        return _yml_records(path, split)
    if kind == "csv":
        return _csv_records(path)
    if kind == "tsv":
        return _tsv_records(path)
    return _txt_lines(path)


def _txt_lines(path: Path) -> Iterator[Record]:
    first = next((r for r in lines(path) if isinstance(r.value, str) and r.value.strip()), None)
    if first is not None and first.value.lstrip().startswith(("<doc", "<summary>")):
        return lcsts_records(path)  # LCSTS's tagged PART_*.txt
    return lines(path)


def _json_records(path: Path, split: str | None) -> Iterator[Record]:
    # A .json file is one value and has to be loaded whole; large sets should be .jsonl.
    shape, top = json_or_lines(path) if split is None else ("json", _load_split_file(path))
    if shape == "jsonl":
        yield from jsonl_records(path)
        return
    if top is None:
        return
    if split is None and isinstance(top, dict) and keyed_by_id(top) and not _record_like(top):
        yield from id_records(path, top)
        return
    for key, items in _record_lists(top, split, path):
        label = f"{key} record" if key is not None else "record"
        for i, record in enumerate(items, 1):
            yield Record(f"{path}:{label} {i}", record, whole=record is top)


def _load_split_file(path: Path):
    return load_json(path)


def _record_lists(top, split: str | None, path: Path) -> list[tuple[str | None, list]]:
    """The record lists of a whole-file JSON/YAML value, as (key or None, records) pairs."""
    if split is not None:
        if not isinstance(top, dict):
            raise UserError(f"{path}#{split}: the file holds {json_type(top)}; #NAME selects a "
                            f"key of an object")
        if split not in top:
            raise UserError(f"{path}#{split}: no key '{split}' (keys: {', '.join(map(str, top))})")
        if not isinstance(top[split], list):
            raise UserError(f"{path}#{split}: '{split}' is {json_type(top[split])}, not a list")
        return [(split, top[split])]
    if isinstance(top, list):
        return [(None, top)]
    if not isinstance(top, dict):
        raise UserError(f"{path}:1: expected a list of records or an object, found "
                        f"{json_type(top)}")
    conversations = top.get("conversations")
    if isinstance(conversations, list) and conversations and isinstance(conversations[0], list):
        return [(None, conversations)]  # the chatterbot layout, {categories, conversations}
    if top and all(isinstance(v, list) for v in top.values()) and not _record_like(top):
        return [(key, value) for key, value in top.items()]  # splits: {train: [...], ...}
    return [(None, [top])]  # one record


def _record_like(d: dict) -> bool:
    return bool({"messages", "conversations", "conversation", "history", "chat"} & set(d))


def _yml_records(path: Path, split: str | None) -> Iterator[Record]:
    top, root = yaml_value(path)
    if root is None:
        return
    for key, items in _record_lists(top, split, path):
        if key is None and isinstance(top, dict) and items is top.get("conversations"):
            key = "conversations"  # the chatterbot layout
        for line, record in zip(yaml_item_lines(root, key), items):
            yield Record(f"{path}:{line}", record, line, line, whole=record is top)


def _keyed_rows(rows: Iterator[Record], is_header: Callable[[list[str]], bool]) -> Iterator[Record]:
    """Rows as {column: value} under a header: the first readable row when `is_header(row)`
    says so; without one, rows pass through as lists. A row whose width differs from the
    header's becomes an Unreadable."""
    header, first = None, True
    for record in rows:
        row = record.value
        if isinstance(row, Unreadable):
            yield record
            continue
        if first and is_header(row):
            header = [name.strip().lower() for name in row]
        elif header is None:
            yield record
        elif len(row) != len(header):
            record.value = Unreadable(f"row has {len(row)} fields, the header has "
                                      f"{len(header)}", "row width differs from the header")
            yield record
        else:
            record.value = dict(zip(header, row))
            yield record
        first = False


def _csv_records(path: Path) -> Iterator[Record]:
    # A CSV's first row is its header; a row is named by the line it starts on.
    return _keyed_rows(csv_rows(path), lambda row: True)


def _tsv_records(path: Path) -> Iterator[Record]:
    # A TSV has a header only when its first row names known columns.
    return _keyed_rows(tsv_rows(path), lambda row: all(f.strip().lower() in _COLUMN_NAMES for f in row))


def _filled(value) -> bool:
    """False for what detection must look past: a blank .txt line, an unreadable line."""
    if isinstance(value, Record):
        value = value.value
    return not (isinstance(value, Unreadable) or isinstance(value, str) and not value.strip())


def _peek(records) -> list[Record]:
    """The first records of a stream, up to _PEEK non-blank ones (consumed: chain them back)."""
    first, n = [], 0
    for record in records:
        first.append(record)
        n += _filled(record)
        if n >= _PEEK:
            break
    return first


def _txt_records(records, fmt: Format) -> Iterator[Record]:
    """Records of a .txt: one per non-empty line, or line groups for the multi-line formats."""
    starts = fmt.starts_record
    if starts is None:
        yield from (r for r in records if _filled(r) or isinstance(r.value, Unreadable))
        return
    # Turns contain newlines and blank lines, so a record runs until the next start line.
    head, group, broken = None, [], False
    for record in records:
        line = record.value
        if isinstance(line, Unreadable):
            yield record
            broken = bool(group)  # the conversation it belongs to lost a line: drop it too
            continue
        if group and starts(line):
            if not broken:
                yield Record(head.where, "\n".join(group).strip(), head.line)
            group, broken = [], False
        if not group:
            if not line.strip():
                continue
            head = record
        group.append(line)
    if group and not broken:
        yield Record(head.where, "\n".join(group).strip(), head.line)


# ---------------------------------------------------------------------------------------------
# Detection

_REDGPT_START = re.compile(r"\s*资料\s*[：:]")
_LLAMA2 = re.compile(r"<s>\s*(?:Human|System)\s*[:：]", re.IGNORECASE)
_LABEL = re.compile(r"^[ \t]*(人类|助手|human|assistant)(?:[ \t]*[（(][^）)\n]{0,10}[）)])?[ \t]*[：:]",
                    re.IGNORECASE | re.MULTILINE)
_MOSS_LABEL = re.compile(r"\[(Human|MOSS)\]\s*[:：]")  # MOSS-002's plain_text


def _detect(path: Path, kind: str, first: list[Record]) -> Format:
    first = [record for record in first if _filled(record)]
    if not first:
        raise UserError(f"{path}: no records to detect the conversation format from")
    sample = Sample(kind, [record.value for record in first])
    for fmt in REGISTRY:
        if fmt.detect is not None and fmt.detect(sample):
            return fmt
    raise UserError(f"{path}: cannot tell the conversation format ({_shape(sample, first)}); "
                    f"name it with --format (known: {', '.join(FORMATS)})")


def _shape(sample: Sample, first: list[Record]) -> str:
    """What the file holds, in words, for the error when no format fits."""
    record = sample.first
    if first[0].key is not None:
        ids = ", ".join(repr(r.key) for r in first[:3])
        fields = ", ".join(sorted({str(k) for r in first for k in r.value}))
        return f"an object keyed by ids ({ids}, …) whose values have fields: {fields}"
    if first[0].whole and isinstance(record, dict):
        return _object_shape(record, sample.kind)
    if isinstance(record, dict):
        return f"first record's fields: {', '.join(map(str, list(record)[:12])) or 'none'}"
    if isinstance(record, list):
        return f"first record is a list of {len(record)} items"
    if isinstance(record, str) and sample.kind == "txt":
        return f"first line: {record.strip()[:40]!r}"
    return f"first record is {json_type(record)}"


def _object_shape(top: dict, kind: str) -> str:
    """A file that is one object (not a list of records, not records keyed by id), in words."""
    if not top:
        return "an empty JSON object" if kind == "json" else "an empty mapping"
    keys = [str(k) for k in top]
    # Record ids ({"11290": "...", ...}) whose values are not records: naming the ids as
    # "fields" would send the user looking for fields that are not there.
    if all(k.isdigit() for k in keys):
        ids = ", ".join(repr(k) for k in keys[:3]) + (", …" if len(keys) > 3 else "")
        return f"an object keyed by ids ({ids}) whose values are {_plural_types(top.values())}"
    return f"one object with fields: {', '.join(keys[:12])}"


_PLURALS = {"an object": "objects", "a list": "lists", "a string": "strings",
            "a boolean": "booleans", "a number": "numbers", "null": "null"}


def _plural_types(values) -> str:
    """ "strings", "strings and numbers": the JSON types of `values`, in order of appearance."""
    names = list(dict.fromkeys(_PLURALS.get(json_type(v), json_type(v)) for v in values))
    return " and ".join(names) if len(names) <= 2 else f"{', '.join(names[:-1])} and {names[-1]}"


def _text_field(sample: Sample) -> str | None:
    text = sample.first.get("text") if isinstance(sample.first, dict) else None
    return text if isinstance(text, str) else None


def _txt_line(sample: Sample) -> str | None:
    record = sample.first
    return record.strip() if sample.kind == "txt" and isinstance(record, str) else None


def _messages_first(sample: Sample):
    """(whether `messages` is a list, its first item) of the first record."""
    messages = sample.first.get("messages") if isinstance(sample.first, dict) else None
    if not isinstance(messages, list):
        return False, None
    return True, messages[0] if messages else None


def _is_kdconv(sample: Sample) -> bool:
    found, first = _messages_first(sample)
    return found and isinstance(first, dict) and "message" in first


def _is_openai(sample: Sample) -> bool:
    return _messages_first(sample)[0]


def _is_llama2_text(sample: Sample) -> bool:
    if "dialogue" in sample.keys:
        return False
    text = _text_field(sample)
    line = _txt_line(sample)
    return (text is not None and bool(_LLAMA2.search(text))) or \
        (line is not None and line.startswith("<s>"))


def _is_babyllama_text(sample: Sample) -> bool:
    if "dialogue" in sample.keys:
        return True
    text = _text_field(sample) or _txt_line(sample)
    return text is not None and bool(_REDGPT_START.match(text) or _LABEL.match(text))


def _is_moss(sample: Sample) -> bool:
    record = sample.first
    if not isinstance(record, dict):
        return False
    chat, text = record.get("chat"), record.get("plain_text")
    if isinstance(chat, dict):
        return any(isinstance(turn, dict) and {"Human", "MOSS"} & set(turn)
                   for turn in chat.values())
    return isinstance(text, str) and bool(_MOSS_LABEL.search(text))


def _is_lcsts(sample: Sample) -> bool:
    keys = sample.keys
    return bool("summary" in keys and keys & {"text", "content"} or {"title", "content"} <= keys)


def _is_prompt_answer(sample: Sample) -> bool:
    keys = sample.keys
    return bool(keys & set(PROMPT_FIELDS)) and bool(keys & {*ANSWER_FIELDS,
                                                           *REFERENCE_ANSWER_FIELDS})


def _is_csl(sample: Sample) -> bool:
    record = sample.first
    # prompt, abstract, title: the text is longer than its title
    return sample.kind == "tsv" and isinstance(record, list) and len(record) == 3 and \
        len(record[1]) > len(record[2])


def _utterance_lists(sample: Sample) -> list | None:
    """The first records as utterance lists, when the file holds dialogues; else None."""
    record = sample.first
    if sample.kind == "yml":
        return None
    if isinstance(record, list) and len(record) >= 2 and all(isinstance(u, str) for u in record):
        return sample.records
    line = _txt_line(sample)
    if line is not None and "\t" in line:
        return [r for r in sample.records if r.strip()]
    return None


def _is_lccc(sample: Sample) -> bool:
    """Dialogues whose text is split into single characters by spaces."""
    records = _utterance_lists(sample)
    if records is None:
        return False
    tokens = [token for record in records
              for utterance in (record.split("\t") if isinstance(record, str) else record)
              if isinstance(utterance, str) for token in utterance.split()]
    single = sum(len(t) == 1 for t in tokens)
    return len(tokens) >= 10 and single >= 0.9 * len(tokens)


def _is_dialogues(sample: Sample) -> bool:
    return _utterance_lists(sample) is not None


def _is_chatterbot(sample: Sample) -> bool:
    return sample.kind == "yml" and isinstance(sample.first, list)


# ---------------------------------------------------------------------------------------------
# Normal form

def merge_turns(turns: list[tuple[str, object]], noun: str = "message") -> tuple[str | None, list[dict]]:
    """(system prompt, messages) of (role, content) turns: contents stripped, a leading system
    turn as the system prompt, consecutive turns of one role joined by a newline (a user who
    sends two messages in a row asked one question). Raises BadRecord naming `noun` i for a
    content that is not a string or is empty, or a system turn after the first message. Shared
    by the conversation and the preference-pair readers."""
    system = None
    messages: list[dict] = []
    for i, (role, content) in enumerate(turns, 1):
        if not isinstance(content, str):
            raise BadRecord(f"{noun} {i} is {json_type(content)}, not a string")
        content = content.strip()
        if not content:
            raise BadRecord(f"{noun} {i} ({role}) is empty")
        if role == "system":
            if messages:
                raise BadRecord(f"{noun} {i} is a system message inside the conversation; "
                                f"only a leading one is supported")
            system = content if system is None else f"{system}\n{content}"
        elif messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + content
        else:
            messages.append({"role": role, "content": content})
    return system, messages


def _finish(turns: list[tuple[str, object]], alternating: bool = False,
            noun: str = "message") -> Parsed:
    """Validated messages and system prompt of (role, content) turns; raises BadRecord."""
    system, messages = merge_turns(turns, noun)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("a single utterance, no reply" if alternating else "no assistant turn")
    unanswered = 0
    if messages[-1]["role"] == "user":
        # The last turn got no reply: nothing to learn from it, but the answered turns before
        # it are still good data (a truncated export, a user who left).
        messages.pop()
        unanswered = 0 if alternating else 1
    return Parsed(messages, system, None, unanswered)


def _alternate(utterances: list) -> list[tuple[str, object]]:
    return [("user" if i % 2 == 0 else "assistant", u) for i, u in enumerate(utterances)]


def _role(value, i: int) -> str:
    role = _ROLES.get(value.strip().lower()) if isinstance(value, str) else None
    if role is None:
        raise BadRecord(f"message {i} has unknown role {value!r} (known: {', '.join(_ROLES)})")
    return role


def _object(record) -> dict:
    if not isinstance(record, dict):
        raise BadRecord(f"expected an object, found {json_type(record)}")
    return record


def _field(record: dict, *names: str):
    """The value of the first of `names` present in the record."""
    for name in names:
        if name in record:
            return record[name]
    fields = ", ".join(map(str, list(record)[:10])) or "none"
    wanted = "' or '".join(names)
    raise BadRecord(f"no '{wanted}' field (fields: {fields})")


def _string(value, name: str, optional: bool = False) -> str:
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"'{name}' is {json_type(value)}, not a string")
    return value


def _list(value, name: str) -> list:
    if not isinstance(value, list):
        raise BadRecord(f"'{name}' is {json_type(value)}, not a list")
    return value


def _system(record: dict) -> str | None:
    value = _string(record.get("system"), "system", optional=True).strip()
    return value or None


# ---------------------------------------------------------------------------------------------
# Parsers: record -> Parsed, raising BadRecord

def _parse_openai(record, seed: int) -> Parsed:
    return _parse_message_list(record, "messages", ("role", "speaker"),
                               ("content", "text"))


def _parse_sharegpt(record, seed: int) -> Parsed:
    return _parse_message_list(record, "conversations", ("from", "role"), ("value", "content"))


def _parse_message_list(record, field: str, role_keys: tuple[str, ...],
                        content_keys: tuple[str, ...]) -> Parsed:
    """`{field: [{role, content}, ...]}` under the first of the given key names that is present."""
    def named(m: dict, keys: tuple[str, ...], i: int):
        key = next((k for k in keys if k in m), None)
        if key is None:
            alias = f" (or {', '.join(repr(k) for k in keys[1:])})" if len(keys) > 1 else ""
            raise BadRecord(f"message {i} has no {keys[0]!r}{alias}")
        return m[key]

    record = _object(record)
    turns = []
    for i, m in enumerate(_list(_field(record, field), field), 1):
        if not isinstance(m, dict):
            raise BadRecord(f"message {i} is {json_type(m)}, not an object")
        role = named(m, role_keys, i)
        turns.append((_role(role, i), _content_text(named(m, content_keys, i), i)))
    parsed = _finish(turns)
    parsed.system = parsed.system or _system(record)
    return parsed


def _content_text(content, i: int):
    # OpenAI's multi-part content: a list of {"type": "text", "text": ...} parts is plain text.
    if isinstance(content, list):
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
               for p in content):
            return "".join(p["text"] for p in content)
        raise BadRecord(f"message {i} content is a list with non-text parts")
    return content


def _parse_alpaca(record, seed: int) -> Parsed:
    record = _object(record)
    instruction = _string(record.get("instruction"), "instruction", optional=True).strip()
    extra = _string(record.get("input"), "input", optional=True).strip()
    output = _string(_field(record, "output"), "output")
    if not output.strip():
        raise BadRecord("'output' is empty (an empty assistant turn)")
    turns: list[tuple[str, object]] = []
    for i, pair in enumerate(_list(record.get("history") or [], "history"), 1):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise BadRecord(f"history item {i} is not a [question, answer] pair")
        turns += [("user", pair[0]), ("assistant", pair[1])]
    labelled = _labelled_turns(instruction)[1] if _LABEL.match(instruction) else []
    if labelled and labelled[-1][0] == "assistant" and not labelled[-1][1].strip():
        # BELLE multi-turn: "Human: q1\nAssistant: a1\nHuman: q2\nAssistant:" + output
        turns += labelled[:-1]
        if extra:
            turns.append(("user", extra))
    else:
        user = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
        if not user:
            raise BadRecord("'instruction' and 'input' are both empty")
        turns.append(("user", user))
    turns.append(("assistant", output))
    parsed = _finish(turns)
    return Parsed(parsed.messages, _system(record))


def _parse_firefly(record, seed: int) -> Parsed:
    record = _object(record)
    turns = []
    for i, turn in enumerate(_list(_field(record, "conversation"), "conversation"), 1):
        if not isinstance(turn, dict):
            raise BadRecord(f"turn {i} is {json_type(turn)}, not an object")
        for key, role in (("human", "user"), ("assistant", "assistant")):
            if key not in turn:
                raise BadRecord(f"turn {i} has no '{key}'")
            turns.append((role, turn[key]))
    parsed = _finish(turns)
    return Parsed(parsed.messages, _system(record))


# MOSS-003: "<|Human|>: 你好<eoh>\n" and "<|MOSS|>: 你好！<eom>\n" per turn; MOSS-002's
# plain_text: "[Human]: 你好<eoh> [MOSS]: 你好！<eoa> [Human]: …".
_MOSS_TURN = re.compile(r"turn_(\d+)")
_MOSS_PREFIX = {"Human": re.compile(r"\s*<\|Human\|>\s*[:：]"),
                "MOSS": re.compile(r"\s*<\|MOSS\|>\s*[:：]")}
_MOSS_END = {"user": ("<eoh>",), "assistant": ("<eom>", "<eoa>")}


def _moss_unmark(text: str, role: str) -> str:
    """`text` stripped, without the end marker of `role`'s turns (<eoh>; <eom> or <eoa>)."""
    text = text.strip()
    for end in _MOSS_END[role]:
        if text.endswith(end):
            return text[:-len(end)].strip()
    return text


def _parse_moss(record, seed: int) -> Parsed:
    record = _object(record)
    system = _string(record.get("meta_instruction"), "meta_instruction",
                     optional=True).strip() or None
    chat = _field(record, "chat", "plain_text")
    if "chat" not in record:
        return _parse_moss_plain_text(_string(chat, "plain_text"), system)
    if not isinstance(chat, dict):
        raise BadRecord(f"'chat' is {json_type(chat)}, not an object")
    numbered = []
    for key, turn in chat.items():
        m = _MOSS_TURN.fullmatch(str(key))
        if m is None:
            raise BadRecord(f"'chat' key {key!r} is not turn_N")
        numbered.append((int(m.group(1)), key, turn))
    if not numbered:
        raise BadRecord("'chat' has no turns")
    turns: list[tuple[str, object]] = []
    for _, key, turn in sorted(numbered, key=lambda item: item[0]):
        if not isinstance(turn, dict):
            raise BadRecord(f"{key} is {json_type(turn)}, not an object")
        # Inner Thoughts, Commands and Tool Responses are left out (see the module docstring).
        for name, role in (("Human", "user"), ("MOSS", "assistant")):
            if name not in turn:
                raise BadRecord(f"{key} has no '{name}'")
            text = _string(turn[name], f"{key}.{name}")
            m = _MOSS_PREFIX[name].match(text)
            text = _moss_unmark(text[m.end():] if m else text, role)
            if not text:
                raise BadRecord(f"{key} has an empty '{name}'")
            turns.append((role, text))
    parsed = _finish(turns, noun="turn")
    parsed.system = system
    return parsed


def _parse_moss_plain_text(text: str, system: str | None) -> Parsed:
    prefix, turns = _labelled_turns(text, _MOSS_LABEL)
    if not turns:
        raise BadRecord("'plain_text' has no '[Human]:' / '[MOSS]:' turns")
    parsed = _finish([(role, _moss_unmark(content, role)) for role, content in turns],
                     noun="turn")
    parsed.system = system or prefix.strip() or None
    return parsed


def _parse_kdconv(record, seed: int) -> Parsed:
    record = _object(record)
    utterances, knowledge = [], {}  # dict as an ordered set of document lines
    for i, m in enumerate(_list(_field(record, "messages"), "messages"), 1):
        if not isinstance(m, dict) or "message" not in m:
            raise BadRecord(f"message {i} has no 'message'")
        utterances.append(m["message"])
        for attr in m.get("attrs") or []:
            if isinstance(attr, dict) and isinstance(attr.get("attrvalue"), str):
                knowledge[_knowledge_line(attr)] = None
    parsed = _finish(_alternate(utterances), alternating=True, noun="utterance")
    return Parsed(parsed.messages, None, "\n".join(knowledge) or None)


def _knowledge_line(attr: dict) -> str:
    # An "Information" attribute is a passage about the entity and reads on its own; any other
    # is a triple whose bare value ("2900万美元") would mean nothing without its entity and
    # attribute, so it is written out as "恋恋笔记本的制片成本：2900万美元".
    name, value = attr.get("attrname"), attr["attrvalue"].strip()
    if name == "Information" or not isinstance(name, str):
        return value
    entity = attr.get("name")
    return f"{entity}的{name}：{value}" if isinstance(entity, str) and entity else f"{name}：{value}"


def _labelled_turns(text: str, label: re.Pattern = _LABEL) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first label, [(role, content), ...]) of 人类：/助手： labelled text (or
    of another `label` pattern whose group 1 is a human or an assistant name)."""
    matches = list(label.finditer(text))
    prefix = text[:matches[0].start()] if matches else text
    turns = []
    for m, nxt in zip(matches, matches[1:] + [None]):
        role = "user" if m.group(1).lower() in ("人类", "human") else "assistant"
        turns.append((role, text[m.end():nxt.start() if nxt else len(text)]))
    return prefix, turns


def _parse_babyllama_text(record, seed: int) -> Parsed:
    document = None
    if isinstance(record, dict):
        text = _string(_field(record, "dialogue", "text"), "dialogue")
        document = _string(record.get("reference", record.get("document")), "reference",
                           optional=True).strip() or None
    else:
        text = _string(record, "record")
    prefix, turns = _labelled_turns(text)
    if not turns:
        raise BadRecord("no '人类：' / '助手：' (or Human: / Assistant:) turns")
    head = prefix.strip()
    if head:
        m = _REDGPT_START.match(head)
        if m is None:
            raise BadRecord(f"text before the first turn does not start with '资料：': "
                            f"{head[:30]!r}")
        document = document or head[m.end():].strip() or None
    parsed = _finish(turns, noun="turn")
    parsed.system = _system(record) if isinstance(record, dict) else None
    parsed.document = document
    return parsed


_LLAMA2_ROLE = re.compile(r"\s*(Human|Assistant|System)\s*[:：]", re.IGNORECASE)


def _parse_llama2_text(record, seed: int) -> Parsed:
    text = _string(_field(record, "text"), "text") if isinstance(record, dict) else \
        _string(record, "record")
    parts = text.split("<s>")
    if parts[0].strip():
        raise BadRecord(f"text before the first <s>: {parts[0].strip()[:30]!r}")
    turns = []
    for i, part in enumerate(parts[1:], 1):
        part = part.strip()
        if part.endswith("</s>"):
            part = part[:-len("</s>")]
        if not part.strip():
            continue
        m = _LLAMA2_ROLE.match(part)
        if m is None:
            raise BadRecord(f"segment {i} does not start with 'Human:' or 'Assistant:': "
                            f"{part[:30]!r}")
        turns.append((_role(m.group(1), i), part[m.end():]))
    return _finish(turns, noun="segment")


def _parse_prompt_answer(record, seed: int) -> Parsed:
    record = {str(k).strip().lower(): v for k, v in _object(record).items()}
    prompt = next((name for name in PROMPT_FIELDS if name in record), None)
    answer = next((name for name in (*ANSWER_FIELDS, *REFERENCE_ANSWER_FIELDS)
                   if name in record and name != prompt), None)
    if prompt is None or answer is None:
        raise BadRecord(f"no prompt/answer fields (fields: {', '.join(record) or 'none'})")
    user = _string(record[prompt], prompt)
    reply = _string(record[answer], answer)
    if not reply.strip():
        raise BadRecord(f"'{answer}' is empty (an empty assistant turn)")
    parsed = _finish([("user", user), ("assistant", reply)])
    return Parsed(parsed.messages, _system(record))


def _summary_pair(text, summary, text_name: str, summary_name: str) -> tuple[str, str]:
    text = _string(text, text_name).strip()
    summary = _string(summary, summary_name).strip()
    if not text:
        raise BadRecord(f"'{text_name}' is empty")
    if not summary:
        raise BadRecord(f"'{summary_name}' is empty (an empty assistant turn)")
    return text, summary


def _parse_csl(record, seed: int) -> Parsed:
    if isinstance(record, list):
        if len(record) != 3:
            raise BadRecord(f"expected 3 tab-separated fields (prompt, text, title), found "
                            f"{len(record)}")
        text, summary = _summary_pair(record[1], record[2], "text", "title")
    else:
        record = _object(record)
        text, summary = _summary_pair(_field(record, "abstract", "text"),
                                      _field(record, "title"), "abstract", "title")
    return Parsed(sft_augment.summary_messages(text, summary, seed))


def _parse_lcsts(record, seed: int) -> Parsed:
    record = _object(record)
    text, summary = _summary_pair(_field(record, "text", "content"),
                                  _field(record, "summary", "title"), "text", "summary")
    return Parsed(sft_augment.summary_messages(text, summary, seed))


def _utterances(record) -> list:
    if isinstance(record, str):
        return record.split("\t")
    if not isinstance(record, list):
        raise BadRecord(f"expected a list of utterances, found {json_type(record)}")
    return record


def _parse_dialogues(record, seed: int) -> Parsed:
    return _finish(_alternate(_utterances(record)), alternating=True, noun="utterance")


# LCCC splits every character (Latin letters and digits too: "M T K", "2 4 岁") by a space. A
# space is kept only between two Latin words of two or more characters, the one case where the
# source text must have had a real space.
_SPLIT_SPACE = re.compile(r"(?<![A-Za-z0-9]{2}) +| +(?![A-Za-z0-9]{2})")


def unsplit_characters(text: str) -> str:
    """LCCC text without its character-separating spaces: '我 也 是 C F' -> '我也是CF'."""
    return _SPLIT_SPACE.sub("", text.strip())


def _parse_lccc(record, seed: int) -> Parsed:
    utterances = [unsplit_characters(u) if isinstance(u, str) else u
                  for u in _utterances(record)]
    return _finish(_alternate(utterances), alternating=True, noun="utterance")


# ---------------------------------------------------------------------------------------------
# The registry: detection tries the entries in this order; FORMATS lists them by name.

REGISTRY: tuple[Format, ...] = (
    Format("openai", "{messages: [{role, content}]} (roles user/usr/human, assistant/sys/bot)",
           _parse_openai, lambda s: _is_openai(s) and not _is_kdconv(s)),
    Format("sharegpt", "{conversations: [{from, value}]} (human/gpt; role/content too)",
           _parse_sharegpt, lambda s: "conversations" in s.keys and not _is_openai(s)),
    Format("alpaca", "{instruction, input, output} (+ system, history), Alpaca/BELLE",
           _parse_alpaca, lambda s: {"instruction", "output"} <= s.keys
           and not (_is_openai(s) or s.keys & {"conversations", "conversation"})),
    Format("firefly", "{conversation: [{human, assistant}]} (+ system), Firefly/MOSS",
           _parse_firefly, lambda s: "conversation" in s.keys and not
           (_is_openai(s) or "conversations" in s.keys)),
    Format("moss", "{meta_instruction, chat: {turn_N: {Human, MOSS}}} (MOSS-003-SFT) or "
           "{plain_text: '[Human]: …<eoh> [MOSS]: …<eoa>'} (MOSS-002)", _parse_moss, _is_moss),
    Format("kdconv", "{name, messages: [{message, attrs}]}, KdConv; knowledge becomes the "
           "document", _parse_kdconv, _is_kdconv),
    Format("babyllama-text", "资料：…\\n\\n人类：…\\n\\n助手：… text (text/dialogue field, .txt), "
           "RedGPT", _parse_babyllama_text, lambda s: _is_babyllama_text(s)
           and not _is_llama2_text(s), _REDGPT_START.match),
    Format("llama2-text", "<s>Human: …</s><s>Assistant: …</s> text (text field, .txt)",
           _parse_llama2_text, _is_llama2_text, lambda line: line.lstrip().startswith("<s>")),
    Format("prompt-answer", "single-turn question/answer fields or columns (prompt, query, "
           "input, instruction; response, output, target, reference_answer)",
           _parse_prompt_answer, lambda s: _is_prompt_answer(s) and not _is_lcsts(s)),
    Format("csl", "CSL summarization TSV: prompt<TAB>text<TAB>title, as a dialogue",
           _parse_csl, _is_csl),
    Format("lcsts", "{summary, text} or {title, content} summarization pairs (LCSTS .txt too), "
           "as a dialogue", _parse_lcsts, _is_lcsts),
    Format("dialogues", "lists of alternating utterances (JSON lists, tab-separated lines)",
           _parse_dialogues, lambda s: _is_dialogues(s) and not _is_lccc(s)),
    Format("lccc", "dialogues with character-split text (LCCC); the spaces are removed",
           _parse_lccc, _is_lccc),
    Format("chatterbot", "chatterbot-corpus YAML: conversations: [[a, b, ...]]",
           _parse_dialogues, _is_chatterbot),
)
FORMAT_BY_NAME = {fmt.name: fmt for fmt in REGISTRY}
FORMATS = {fmt.name: fmt.shape for fmt in REGISTRY}
