"""Read SFT conversations out of the dataset layouts people actually have.

`iter_conversations(source)` yields one `Conversation` per record, whatever the layout: every
format below is turned into the same normal form, `messages` alternating between "user" and
"assistant" (non-empty strings, ending with an assistant turn), plus an optional `system`
prompt and an optional reference `document` (seed 0's 资料).

Formats (`FORMATS`; detected per file from the extension and the first record's fields, or
named with `format=`):

- openai: `{messages: [{role, content}]}`; a leading system message becomes `.system`.
- sharegpt: `{conversations: [{from, value}]}` (human/gpt/...; role/content also accepted),
  optional top-level `system`.
- alpaca: `{instruction, input, output}` (user = instruction + "\\n" + input), optional
  `system` and `history: [[q, a], ...]` (Alpaca, BELLE, LLaMA-Factory); BELLE's multi-turn
  `instruction` ("Human:…\\nAssistant:…\\nHuman:…\\nAssistant:") is split into its turns.
- firefly: `{conversation: [{human, assistant}, ...]}`, optional `system` (Firefly, MOSS).
- kdconv: `{name, messages: [{message, attrs?}]}`: speakers alternate from the user; the
  knowledge in `attrs` becomes the document.
- babyllama-text: seed 0's `资料：…\\n\\n人类：…\\n\\n助手：…` (Human:/Assistant: too) in a `text`
  or `dialogue` field, the document in a `reference` field or the 资料 prefix (this reads
  RedGPT-Dataset-V1-CN as it is); in a .txt each conversation starts at a `资料：` line.
- llama2-text: `<s>Human: …\\n</s><s>Assistant: …\\n</s>` in a `text` field (FlagAlpha's
  Llama2-Chinese data) or a .txt in which each line that starts with `<s>` starts one.
- prompt-answer: fields or CSV columns prompt/answer (also question/answer, q/a,
  input/output, prompt/response, query/response, prompt/completion; any case).
- csl: CSL's TSV without header, `prompt \\t text \\t title`: a summarization pair.
- lcsts: `{summary, text}` or `{title, content}` (LCSTS-style news): a summarization pair.
- dialogues: a JSON list of utterance lists (speakers alternate, first = user), a JSON object
  of such lists (splits), or .txt/.tsv lines of tab-separated utterances (LCCC's pair files).
- lccc: `dialogues` whose text is split into characters by spaces; the spaces are removed.
- chatterbot: chatterbot-corpus YAML, `conversations: [[a, b, c, ...], ...]`; the built-in
  `builtin:chatterbot-zh` is its Chinese part.

Files: .jsonl, .json (a list; an object of lists is read as splits, `file.json#train` picks
one; JSON lines in a .json file, as RedGPT ships them, are read as .jsonl), .csv (with a
header), .tsv, .txt, .yml/.yaml, and .gz of any of them; or a directory of such files.

Choices made once, here:
- Consecutive messages of the same role are merged into one, joined with "\\n" (a user who
  sends two messages in a row asked one question); contents are stripped of surrounding
  whitespace.
- Where roles are explicit, a conversation that ends with a user turn is a bad record (the
  data is probably truncated); where speakers only alternate (kdconv, dialogues, lccc,
  chatterbot) a trailing unanswered utterance is simply dropped.
- `lccc` is detected, not only named: a `dialogues` file whose first records are >= 90%
  single-character tokens is read as `lccc`. Name `dialogues` to keep the spaces.
- Summarization pairs (csl, lcsts) become a question and an answer drawn from the templates in
  `sft_augment`, reproducible from `seed` (see there).

Bad records raise `UserError("file:line: problem")` (`file:record N` in a .json list), or with
`skip_bad=True` are counted in a `BadRecords`.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Iterator

from babyllama.data import sft_augment
from babyllama.data.readers import BUILTIN_PREFIX, BadRecords, _decoded_lines, _json_type, \
    _open_binary, _Reporter
from babyllama.errors import UserError
from babyllama.textfile import read_text


@dataclass
class Conversation:
    messages: list[dict]          # [{"role": "user"|"assistant", "content": str}, ...]
    system: str | None = None     # system prompt
    document: str | None = None   # reference passage (seed 0's 资料)
    source: str = ""              # "file:line" (or "file:record N") of the record

    def template_messages(self) -> list[dict]:
        """The messages as a chat template takes them: the system prompt first, if any."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.messages]


FORMATS = {
    "openai": "{messages: [{role, content}]}",
    "sharegpt": "{conversations: [{from, value}]} (human/gpt; role/content too)",
    "alpaca": "{instruction, input, output} (+ system, history), Alpaca/BELLE",
    "firefly": "{conversation: [{human, assistant}]} (+ system), Firefly/MOSS",
    "kdconv": "{name, messages: [{message, attrs}]}, KdConv; knowledge becomes the document",
    "babyllama-text": "资料：…\\n\\n人类：…\\n\\n助手：… text (text/dialogue field, .txt), RedGPT",
    "llama2-text": "<s>Human: …</s><s>Assistant: …</s> text (text field, .txt)",
    "prompt-answer": "prompt,answer columns (question/answer, q/a, input/output)",
    "csl": "CSL summarization TSV: prompt<TAB>text<TAB>title, as a dialogue",
    "lcsts": "{summary, text} or {title, content} summarization pairs, as a dialogue",
    "dialogues": "lists of alternating utterances (JSON lists, tab-separated lines)",
    "lccc": "dialogues with character-split text (LCCC); the spaces are removed",
    "chatterbot": "chatterbot-corpus YAML: conversations: [[a, b, ...]]",
}

BUILTIN_CONVERSATION_FORMAT = "chatterbot"  # builtin:chatterbot-zh

_KINDS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".txt": "txt",
          ".yml": "yml", ".yaml": "yml"}
SUPPORTED = ".jsonl, .json, .csv, .tsv, .txt, .yml/.yaml (and .gz of those)"

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "bot": "assistant", "chatgpt": "assistant", "model": "assistant", "system": "system"}

# Field pairs of the prompt-answer format, tried in order.
_PROMPT_ANSWER = (("prompt", "answer"), ("question", "answer"), ("q", "a"), ("input", "output"),
                  ("prompt", "response"), ("query", "response"), ("prompt", "completion"))
# A TSV whose first row holds only these names has a header.
_COLUMN_NAMES = {name for pair in _PROMPT_ANSWER for name in pair} | {
    "instruction", "system", "text", "summary", "content", "title", "abstract", "dialogue"}


class _Bad(Exception):
    """One record is malformed; the message is the problem (the caller adds the location)."""


@dataclass
class _Unreadable:
    """Stands in the record stream for a line that could not be read (bad JSON, bad UTF-8).

    Readers yield it rather than reporting at once, so that problems are reported in file
    order even though the first records are read ahead to detect the format.
    """

    problem: str


# ---------------------------------------------------------------------------------------------
# Public entry points

def iter_conversations(source, format: str | None = None, *, skip_bad: bool = False,
                       bad: BadRecords | None = None, seed: int = 0,
                       system: str | None = None) -> Iterator[Conversation]:
    """Conversations of one source: a file, a directory, `file.json#split` or `builtin:NAME`.

    `format` overrides detection (it applies to every file of a directory). `system` is the
    system prompt of conversations that have none. `seed` drives the summarization templates.
    """
    if format is not None and format not in FORMATS:
        raise UserError(f"unknown conversation format '{format}' (choose from: "
                        f"{', '.join(FORMATS)})")
    report = _Reporter(skip_bad, bad)
    if isinstance(source, str) and source.startswith(BUILTIN_PREFIX):
        files = [(path, None) for path in _builtin_files(source)]
        format = BUILTIN_CONVERSATION_FORMAT  # the built-in set has one known layout
    else:
        files = _resolve(source)
    for path, split in files:
        yield from _iter_file(path, split, format, report, seed, system)


def detect_format(path) -> str:
    """The format name of a file, from its extension and first records' fields.

    Raises UserError naming what it saw when no format fits.
    """
    if isinstance(path, str) and path.startswith(BUILTIN_PREFIX):
        _builtin_files(path)  # an unknown name or a missing package is an error here too
        return BUILTIN_CONVERSATION_FORMAT
    path, split = _resolve(path)[0]  # a directory: its first file
    kind = _kind(path)
    first = _peek(_records(path, kind, split))
    for where, record in first:
        if isinstance(record, _Unreadable):
            raise UserError(f"{where}: {record.problem}")
    return _detect(path, kind, first)


# ---------------------------------------------------------------------------------------------
# Files and records

_PEEK = 20  # records looked at to detect a format (and whether text is character-split)


def _builtin_files(source: str) -> list[Path]:
    from babyllama.data.builtin import BUILTIN_CONVERSATIONS, chatterbot_files

    name = source[len(BUILTIN_PREFIX):]
    if name == "chatterbot-zh":
        return chatterbot_files(source, "chinese")
    known = ", ".join(f"builtin:{n}" for n in BUILTIN_CONVERSATIONS)
    raise UserError(f"{source}: no such built-in conversation set (available: {known})")


def _resolve(source) -> list[tuple[Path, str | None]]:
    """(file, split) pairs of a source; `file.json#train` selects the key `train`."""
    path, split = Path(source), None
    if not path.exists() and "#" in str(source):
        base, split = str(source).rsplit("#", 1)
        path = Path(base)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and _kind(p) is not None)
        if not files:
            raise UserError(f"{path}: directory holds no supported files ({SUPPORTED})")
        return [(f, split) for f in files]
    if _kind(path) is None:
        raise UserError(f"{path}: unsupported file type '{''.join(path.suffixes) or path.name}'"
                        f" (supported: {SUPPORTED})")
    return [(path, split)]


def _kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        return _KINDS.get(suffixes[-2]) if len(suffixes) >= 2 else None
    return _KINDS.get(path.suffix.lower())


def _iter_file(path: Path, split: str | None, format: str | None, report: _Reporter, seed: int,
               system: str | None) -> Iterator[Conversation]:
    kind = _kind(path)
    records = _records(path, kind, split)
    if format is None:
        first = _peek(records)
        if not any(_filled(record) for _, record in first):
            # Nothing readable: an empty file holds no conversations (the caller decides if
            # that is an error); unreadable lines are still reported.
            for where, record in first:
                if isinstance(record, _Unreadable):
                    report(where, record.problem)
            return
        format = _detect(path, kind, first)
        records = chain(first, records)
    if kind == "txt":
        records = _txt_records(records, format)
    parse = _PARSERS[format]
    for where, record in records:
        if isinstance(record, _Unreadable):
            report(where, record.problem)
            continue
        try:
            messages, record_system, document = parse(record, seed)
        except _Bad as e:
            report(where, str(e))
            continue
        yield Conversation(messages, record_system or system, document or None, where)


def _records(path: Path, kind: str, split: str | None):
    """(location, record) pairs of one file; .txt lines come raw (blank ones included)."""
    if split is not None and kind not in ("json", "yml"):
        raise UserError(f"{path}#{split}: '#{split}' selects a split of a .json or .yml file")
    if kind == "jsonl":
        return _jsonl_records(path)
    if kind == "json":
        return _json_records(path, split)
    if kind == "yml":
        return _yml_records(path, split)
    if kind == "csv":
        return _csv_records(path)
    if kind == "tsv":
        return _tsv_records(path)
    return _lines(path)


def _lines(path: Path) -> Iterator[tuple[str, str | _Unreadable]]:
    """("file:line", text) per line; a line that is not UTF-8 comes as an _Unreadable."""
    failed: list[tuple[str, str]] = []
    with _open_binary(path) as f:
        for n, line in _decoded_lines(path, f, lambda where, problem: failed.append(
                (where, problem))):
            while failed:  # _decoded_lines skips a bad line after reporting it
                where, problem = failed.pop(0)
                yield where, _Unreadable(problem)
            yield f"{path}:{n}", line
    for where, problem in failed:
        yield where, _Unreadable(problem)


def _jsonl_records(path: Path):
    for where, line in _lines(path):
        if isinstance(line, _Unreadable):
            yield where, line
        elif line.strip():
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, _Unreadable(f"invalid JSON: {e.msg} (column {e.colno})")


def _json_records(path: Path, split: str | None):
    # A .json file is one value and has to be loaded whole; large sets should be .jsonl.
    text = read_text(path)
    if not text.strip():
        return
    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and split is None and _is_json(text.split("\n", 1)[0]):
            # One value per line: JSON lines in a .json file (RedGPT-Dataset-V1-CN does this).
            yield from _jsonl_records(path)
            return
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    for key, items in _record_lists(top, split, path):
        label = f"{key} record" if key is not None else "record"
        for i, record in enumerate(items, 1):
            yield f"{path}:{label} {i}", record


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _record_lists(top, split: str | None, path: Path) -> list[tuple[str | None, list]]:
    """The record lists of a whole-file JSON/YAML value, as (key or None, records) pairs."""
    if split is not None:
        if not isinstance(top, dict):
            raise UserError(f"{path}#{split}: the file holds {_json_type(top)}; #NAME selects a "
                            f"key of an object")
        if split not in top:
            raise UserError(f"{path}#{split}: no key '{split}' (keys: {', '.join(map(str, top))})")
        if not isinstance(top[split], list):
            raise UserError(f"{path}#{split}: '{split}' is {_json_type(top[split])}, not a list")
        return [(split, top[split])]
    if isinstance(top, list):
        return [(None, top)]
    if not isinstance(top, dict):
        raise UserError(f"{path}:1: expected a list of records or an object, found "
                        f"{_json_type(top)}")
    conversations = top.get("conversations")
    if isinstance(conversations, list) and conversations and isinstance(conversations[0], list):
        return [(None, conversations)]  # the chatterbot layout, {categories, conversations}
    if top and all(isinstance(v, list) for v in top.values()) and not _record_like(top):
        return [(key, value) for key, value in top.items()]  # splits: {train: [...], ...}
    return [(None, [top])]  # one record


def _record_like(d: dict) -> bool:
    return bool({"messages", "conversations", "conversation", "history"} & set(d))


def _yml_records(path: Path, split: str | None):
    try:
        import yaml
    except ImportError:
        raise UserError(f"{path}: reading YAML needs PyYAML: pip install pyyaml") from None
    try:
        root = yaml.compose(read_text(path), Loader=yaml.BaseLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if root is None:
        return
    # BaseLoader keeps every scalar a string: `- 1984` or `- yes` in a conversation is text,
    # not a number or a boolean.
    top = _plain(root)
    for key, items in _record_lists(top, split, path):
        if key is None and isinstance(top, dict) and items is top.get("conversations"):
            key = "conversations"  # the chatterbot layout
        node = root if key is None else _mapping_get(root, key)
        if isinstance(node, yaml.SequenceNode):
            lines = [n.start_mark.line + 1 for n in node.value]
        else:
            lines = [node.start_mark.line + 1]  # a single record
        for line, record in zip(lines, items):
            yield f"{path}:{line}", record


def _plain(node):
    """A composed YAML node as plain lists, dicts and strings."""
    import yaml

    if isinstance(node, yaml.ScalarNode):
        return node.value
    if isinstance(node, yaml.SequenceNode):
        return [_plain(n) for n in node.value]
    return {_plain(k): _plain(v) for k, v in node.value}


def _mapping_get(node, key: str):
    return next(v for k, v in node.value if k.value == key)


def _csv_records(path: Path):
    # Answers can be far longer than csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # csv.reader reads our decoded lines, so line numbers and encoding errors stay exact even
    # for quoted fields spanning lines; a row starts one line after the previous row ended.
    unreadable: list[tuple[str, _Unreadable]] = []

    def text_lines():
        for where, line in _lines(path):
            if isinstance(line, _Unreadable):
                unreadable.append((where, line))
                line = ""  # keeps csv's line count in step with the file
            yield line + "\n"

    reader = csv.reader(text_lines())
    header = None
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            yield from unreadable
            return
        except csv.Error as e:
            row = _Unreadable(f"malformed CSV: {e}")
        yield from unreadable
        unreadable.clear()
        if isinstance(row, _Unreadable):
            yield f"{path}:{start}", row
        elif not row:
            continue
        elif header is None:
            header = [name.strip().lower() for name in row]
        elif len(row) != len(header):
            yield f"{path}:{start}", _Unreadable(f"row has {len(row)} fields, the header has "
                                                 f"{len(header)}")
        else:
            yield f"{path}:{start}", dict(zip(header, row))


def _tsv_records(path: Path):
    # Tab-separated files are not quoted (a `"` in an abstract is just a character), so they
    # are split on tabs rather than read with the csv module.
    header, first = None, True
    for where, line in _lines(path):
        if isinstance(line, _Unreadable):
            yield where, line
            continue
        if not line.strip():
            continue
        fields = line.split("\t")
        if first and all(f.strip().lower() in _COLUMN_NAMES for f in fields):
            header = [f.strip().lower() for f in fields]
        elif header is None:
            yield where, fields
        elif len(fields) != len(header):
            yield where, _Unreadable(f"row has {len(fields)} fields, the header has "
                                     f"{len(header)}")
        else:
            yield where, dict(zip(header, fields))
        first = False


def _filled(record) -> bool:
    """False for what detection must look past: a blank .txt line, an unreadable line."""
    return not (isinstance(record, _Unreadable) or isinstance(record, str) and not record.strip())


def _peek(records) -> list:
    """The first records of a stream, up to _PEEK non-blank ones (consumed: chain them back)."""
    first, n = [], 0
    for item in records:
        first.append(item)
        n += _filled(item[1])
        if n >= _PEEK:
            break
    return first


_REDGPT_START = re.compile(r"\s*资料\s*[：:]")


def _txt_records(lines, format: str):
    """Records of a .txt: one per non-empty line, or line groups for the two text formats."""
    if format == "llama2-text":
        starts = lambda line: line.lstrip().startswith("<s>")  # noqa: E731
    elif format == "babyllama-text":
        starts = _REDGPT_START.match
    else:
        yield from ((where, line) for where, line in lines if _filled(line)
                    or isinstance(line, _Unreadable))
        return
    # Turns contain newlines and blank lines, so a record runs until the next start line.
    where, group, broken = None, [], False
    for line_where, line in lines:
        if isinstance(line, _Unreadable):
            yield line_where, line
            broken = bool(group)  # the conversation it belongs to lost a line: drop it too
            continue
        if group and starts(line):
            if not broken:
                yield where, "\n".join(group).strip()
            group, broken = [], False
        if not group:
            if not line.strip():
                continue
            where = line_where
        group.append(line)
    if group and not broken:
        yield where, "\n".join(group).strip()


# ---------------------------------------------------------------------------------------------
# Detection

_LLAMA2 = re.compile(r"<s>\s*(?:Human|System)\s*[:：]", re.IGNORECASE)
_LABEL = re.compile(r"^[ \t]*(人类|助手|human|assistant)(?:[ \t]*[（(][^）)\n]{0,10}[）)])?[ \t]*[：:]",
                    re.IGNORECASE | re.MULTILINE)


def _detect(path: Path, kind: str, first: list) -> str:
    first = [(where, record) for where, record in first if _filled(record)]
    if not first:
        raise UserError(f"{path}: no records to detect the conversation format from")
    record = first[0][1]
    if isinstance(record, dict):
        name = _detect_fields(record)
        if name is not None:
            return name
        fields = ", ".join(map(str, list(record)[:12])) or "none"
        saw = f"first record's fields: {fields}"
    elif isinstance(record, list):
        if kind == "yml":
            return "chatterbot"
        if kind == "tsv" and len(record) == 3 and len(record[1]) > len(record[2]):
            return "csl"  # prompt, abstract, title: the text is longer than its title
        if len(record) >= 2 and all(isinstance(u, str) for u in record):
            return _dialogue_kind([r for _, r in first])
        saw = f"first record is a list of {len(record)} items"
    elif isinstance(record, str) and kind == "txt":
        line = record.strip()
        if line.startswith("<s>"):
            return "llama2-text"
        if _REDGPT_START.match(line) or _LABEL.match(line):
            return "babyllama-text"
        if "\t" in line:
            return _dialogue_kind([r for _, r in first if r.strip()])
        saw = f"first line: {line[:40]!r}"
    else:
        saw = f"first record is {_json_type(record)}"
    raise UserError(f"{path}: cannot tell the conversation format ({saw}); name it with "
                    f"--format (known: {', '.join(FORMATS)})")


def _detect_fields(record: dict) -> str | None:
    keys = {str(k).lower() for k in record}
    messages = record.get("messages")
    if isinstance(messages, list):
        first = messages[0] if messages else None
        return "kdconv" if isinstance(first, dict) and "message" in first else "openai"
    if "conversations" in keys:
        return "sharegpt"
    if "conversation" in keys:
        return "firefly"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "dialogue" in keys:
        return "babyllama-text"
    text = record.get("text")
    if isinstance(text, str):
        if _LLAMA2.search(text):
            return "llama2-text"
        if _REDGPT_START.match(text) or _LABEL.match(text):
            return "babyllama-text"
    if "summary" in keys and keys & {"text", "content"} or {"title", "content"} <= keys:
        return "lcsts"
    if any(a in keys and b in keys for a, b in _PROMPT_ANSWER):
        return "prompt-answer"
    return None


def _dialogue_kind(records: list) -> str:
    """`lccc` when the text is split into single characters by spaces, else `dialogues`."""
    tokens = [token for record in records
              for utterance in (record.split("\t") if isinstance(record, str) else record)
              if isinstance(utterance, str) for token in utterance.split()]
    single = sum(len(t) == 1 for t in tokens)
    return "lccc" if len(tokens) >= 10 and single >= 0.9 * len(tokens) else "dialogues"


# ---------------------------------------------------------------------------------------------
# Normal form

def _finish(turns: list[tuple[str, object]], alternating: bool = False,
            noun: str = "message") -> tuple[list[dict], str | None]:
    """Validated messages and system prompt of (role, content) turns; raises _Bad."""
    system = None
    messages: list[dict] = []
    for i, (role, content) in enumerate(turns, 1):
        if not isinstance(content, str):
            raise _Bad(f"{noun} {i} is {_json_type(content)}, not a string")
        content = content.strip()
        if not content:
            raise _Bad(f"{noun} {i} ({role}) is empty")
        if role == "system":
            if messages:
                raise _Bad(f"{noun} {i} is a system message inside the conversation; only a "
                           f"leading one is supported")
            system = content if system is None else f"{system}\n{content}"
        elif messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + content
        else:
            messages.append({"role": role, "content": content})
    if alternating and messages and messages[-1]["role"] == "user":
        messages.pop()  # the last utterance got no reply: nothing to learn from it
    if not any(m["role"] == "assistant" for m in messages):
        raise _Bad("a single utterance, no reply" if alternating else "no assistant turn")
    if messages[-1]["role"] != "assistant":
        raise _Bad("the conversation ends with a user turn (no reply to learn from)")
    return messages, system


def _alternate(utterances: list) -> list[tuple[str, object]]:
    return [("user" if i % 2 == 0 else "assistant", u) for i, u in enumerate(utterances)]


def _role(value, i: int) -> str:
    role = _ROLES.get(value.strip().lower()) if isinstance(value, str) else None
    if role is None:
        raise _Bad(f"message {i} has unknown role {value!r} (known: {', '.join(_ROLES)})")
    return role


def _object(record) -> dict:
    if not isinstance(record, dict):
        raise _Bad(f"expected an object, found {_json_type(record)}")
    return record


def _field(record: dict, *names: str):
    """The value of the first of `names` present in the record."""
    for name in names:
        if name in record:
            return record[name]
    fields = ", ".join(map(str, list(record)[:10])) or "none"
    wanted = "' or '".join(names)
    raise _Bad(f"no '{wanted}' field (fields: {fields})")


def _string(value, name: str, optional: bool = False) -> str:
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise _Bad(f"'{name}' is {_json_type(value)}, not a string")
    return value


def _list(value, name: str) -> list:
    if not isinstance(value, list):
        raise _Bad(f"'{name}' is {_json_type(value)}, not a list")
    return value


def _system(record: dict) -> str | None:
    value = _string(record.get("system"), "system", optional=True).strip()
    return value or None


# ---------------------------------------------------------------------------------------------
# Parsers: record -> (messages, system, document), raising _Bad

Parsed = tuple[list[dict], str | None, str | None]


def _parse_openai(record, seed: int) -> Parsed:
    return _parse_message_list(record, "messages", ("role",), ("content",))


def _parse_sharegpt(record, seed: int) -> Parsed:
    return _parse_message_list(record, "conversations", ("from", "role"), ("value", "content"))


def _parse_message_list(record, field: str, role_keys: tuple[str, ...],
                        content_keys: tuple[str, ...]) -> Parsed:
    """`{field: [{role, content}, ...]}` under the first of the given key names that is present."""
    def named(m: dict, keys: tuple[str, ...], i: int):
        key = next((k for k in keys if k in m), None)
        if key is None:
            alias = f" (or {', '.join(repr(k) for k in keys[1:])})" if len(keys) > 1 else ""
            raise _Bad(f"message {i} has no {keys[0]!r}{alias}")
        return m[key]

    record = _object(record)
    turns = []
    for i, m in enumerate(_list(_field(record, field), field), 1):
        if not isinstance(m, dict):
            raise _Bad(f"message {i} is {_json_type(m)}, not an object")
        role = named(m, role_keys, i)
        turns.append((_role(role, i), _content_text(named(m, content_keys, i), i)))
    messages, system = _finish(turns)
    return messages, system or _system(record), None


def _content_text(content, i: int):
    # OpenAI's multi-part content: a list of {"type": "text", "text": ...} parts is plain text.
    if isinstance(content, list):
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
               for p in content):
            return "".join(p["text"] for p in content)
        raise _Bad(f"message {i} content is a list with non-text parts")
    return content


def _parse_alpaca(record, seed: int) -> Parsed:
    record = _object(record)
    instruction = _string(record.get("instruction"), "instruction", optional=True).strip()
    extra = _string(record.get("input"), "input", optional=True).strip()
    output = _string(_field(record, "output"), "output")
    if not output.strip():
        raise _Bad("'output' is empty (an empty assistant turn)")
    turns: list[tuple[str, object]] = []
    for i, pair in enumerate(_list(record.get("history") or [], "history"), 1):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _Bad(f"history item {i} is not a [question, answer] pair")
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
            raise _Bad("'instruction' and 'input' are both empty")
        turns.append(("user", user))
    turns.append(("assistant", output))
    messages, _ = _finish(turns)
    return messages, _system(record), None


def _parse_firefly(record, seed: int) -> Parsed:
    record = _object(record)
    turns = []
    for i, turn in enumerate(_list(_field(record, "conversation"), "conversation"), 1):
        if not isinstance(turn, dict):
            raise _Bad(f"turn {i} is {_json_type(turn)}, not an object")
        for key, role in (("human", "user"), ("assistant", "assistant")):
            if key not in turn:
                raise _Bad(f"turn {i} has no '{key}'")
            turns.append((role, turn[key]))
    messages, _ = _finish(turns)
    return messages, _system(record), None


def _parse_kdconv(record, seed: int) -> Parsed:
    record = _object(record)
    utterances, knowledge = [], {}  # dict as an ordered set of document lines
    for i, m in enumerate(_list(_field(record, "messages"), "messages"), 1):
        if not isinstance(m, dict) or "message" not in m:
            raise _Bad(f"message {i} has no 'message'")
        utterances.append(m["message"])
        for attr in m.get("attrs") or []:
            if isinstance(attr, dict) and isinstance(attr.get("attrvalue"), str):
                knowledge[_knowledge_line(attr)] = None
    messages, _ = _finish(_alternate(utterances), alternating=True, noun="utterance")
    return messages, None, "\n".join(knowledge) or None


def _knowledge_line(attr: dict) -> str:
    # An "Information" attribute is a passage about the entity and reads on its own; any other
    # is a triple whose bare value ("2900万美元") would mean nothing without its entity and
    # attribute, so it is written out as "恋恋笔记本的制片成本：2900万美元".
    name, value = attr.get("attrname"), attr["attrvalue"].strip()
    if name == "Information" or not isinstance(name, str):
        return value
    entity = attr.get("name")
    return f"{entity}的{name}：{value}" if isinstance(entity, str) and entity else f"{name}：{value}"


def _labelled_turns(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first label, [(role, content), ...]) of 人类：/助手： labelled text."""
    matches = list(_LABEL.finditer(text))
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
        raise _Bad("no '人类：' / '助手：' (or Human: / Assistant:) turns")
    head = prefix.strip()
    if head:
        m = _REDGPT_START.match(head)
        if m is None:
            raise _Bad(f"text before the first turn does not start with '资料：': {head[:30]!r}")
        document = document or head[m.end():].strip() or None
    messages, _ = _finish(turns, noun="turn")
    return messages, _system(record) if isinstance(record, dict) else None, document


_LLAMA2_ROLE = re.compile(r"\s*(Human|Assistant|System)\s*[:：]", re.IGNORECASE)


def _parse_llama2_text(record, seed: int) -> Parsed:
    text = _string(_field(record, "text"), "text") if isinstance(record, dict) else \
        _string(record, "record")
    parts = text.split("<s>")
    if parts[0].strip():
        raise _Bad(f"text before the first <s>: {parts[0].strip()[:30]!r}")
    turns = []
    for i, part in enumerate(parts[1:], 1):
        part = part.strip()
        if part.endswith("</s>"):
            part = part[:-len("</s>")]
        if not part.strip():
            continue
        m = _LLAMA2_ROLE.match(part)
        if m is None:
            raise _Bad(f"segment {i} does not start with 'Human:' or 'Assistant:': {part[:30]!r}")
        turns.append((_role(m.group(1), i), part[m.end():]))
    messages, system = _finish(turns, noun="segment")
    return messages, system, None


def _parse_prompt_answer(record, seed: int) -> Parsed:
    record = {str(k).strip().lower(): v for k, v in _object(record).items()}
    for prompt, answer in _PROMPT_ANSWER:
        if prompt in record and answer in record:
            user = _string(record[prompt], prompt)
            reply = _string(record[answer], answer)
            if not reply.strip():
                raise _Bad(f"'{answer}' is empty (an empty assistant turn)")
            messages, _ = _finish([("user", user), ("assistant", reply)])
            return messages, _system(record), None
    fields = ", ".join(record) or "none"
    raise _Bad(f"no prompt/answer fields (fields: {fields})")


def _summary_pair(text, summary, text_name: str, summary_name: str) -> tuple[str, str]:
    text = _string(text, text_name).strip()
    summary = _string(summary, summary_name).strip()
    if not text:
        raise _Bad(f"'{text_name}' is empty")
    if not summary:
        raise _Bad(f"'{summary_name}' is empty (an empty assistant turn)")
    return text, summary


def _parse_csl(record, seed: int) -> Parsed:
    if isinstance(record, list):
        if len(record) != 3:
            raise _Bad(f"expected 3 tab-separated fields (prompt, text, title), found "
                       f"{len(record)}")
        text, summary = _summary_pair(record[1], record[2], "text", "title")
    else:
        record = _object(record)
        text, summary = _summary_pair(_field(record, "abstract", "text"),
                                      _field(record, "title"), "abstract", "title")
    return sft_augment.summary_messages(text, summary, seed), None, None


def _parse_lcsts(record, seed: int) -> Parsed:
    record = _object(record)
    text, summary = _summary_pair(_field(record, "text", "content"),
                                  _field(record, "summary", "title"), "text", "summary")
    return sft_augment.summary_messages(text, summary, seed), None, None


def _utterances(record) -> list:
    if isinstance(record, str):
        return record.split("\t")
    if not isinstance(record, list):
        raise _Bad(f"expected a list of utterances, found {_json_type(record)}")
    return record


def _parse_dialogues(record, seed: int) -> Parsed:
    messages, _ = _finish(_alternate(_utterances(record)), alternating=True, noun="utterance")
    return messages, None, None


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
    messages, _ = _finish(_alternate(utterances), alternating=True, noun="utterance")
    return messages, None, None


_PARSERS: dict[str, Callable[[object, int], Parsed]] = {
    "openai": _parse_openai,
    "sharegpt": _parse_sharegpt,
    "alpaca": _parse_alpaca,
    "firefly": _parse_firefly,
    "kdconv": _parse_kdconv,
    "babyllama-text": _parse_babyllama_text,
    "llama2-text": _parse_llama2_text,
    "prompt-answer": _parse_prompt_answer,
    "csl": _parse_csl,
    "lcsts": _parse_lcsts,
    "dialogues": _parse_dialogues,
    "lccc": _parse_lccc,
    "chatterbot": _parse_dialogues,
}
assert set(_PARSERS) == set(FORMATS)
