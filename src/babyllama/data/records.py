"""The one record-reading layer: lines, JSON lines, JSON, CSV, TSV, YAML and parquet files as a
stream of `Record`s, each carrying the `file:line` that messages name.

    for record in jsonl_records(path):        # Record(where="a.jsonl:3", value={...})
        if isinstance(record.value, Unreadable):
            report(record.where, record.value.problem, record.value.reason)

Every reader here decodes UTF-8 (a leading BOM is dropped) and never raises for one bad
record: a line that is not UTF-8, not JSON, or a CSV row of the wrong width comes through as an
`Unreadable` in its place, so callers report problems in file order and choose between stopping
(`UserError("file:line: problem")`) and skipping with a count (`BadRecords`, via `Reporter`).
What is wrong with a whole file (invalid JSON in a .json, no such column) raises `UserError`.

Two ways to get a file's lines: streamed and decoded line by line (`whole=False`, corpora that
may not fit in memory; an undecodable line costs only itself), or decoded whole by
`babyllama.textfile.read_text` first (`whole=True`, evaluation sets read all-or-nothing).

Used by the corpus readers (`data/readers.py`), the conversation formats
(`data/conversations.py`), and the evaluation sets (`eval/rouge.py`, `eval/choice.py`).
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from babyllama.errors import UserError, where
from babyllama.textfile import read_text


@dataclass
class Unreadable:
    """Stands in the record stream for a record that could not be read at all.

    `reason` is the short kind of problem that `BadRecords` counts by ("invalid JSON")."""

    problem: str
    reason: str


@dataclass
class Record:
    """One record of a file: `value` is what the file holds there (an object, a list, a
    string), or an `Unreadable`. `where` is "file:line" (or "file:record N" where a format
    counts records instead); `line` the first line; `end` the last (a quoted CSV field may span
    lines); `key` the id of a record inside a JSON object keyed by ids; `whole` whether the
    record is the file's whole value (a .json or .yml holding one object)."""

    where: str
    value: Any
    line: int | None = None
    end: int | None = None
    key: str | None = None
    whole: bool = False


def json_type(value) -> str:
    """How a message names a JSON value's type: "an object", "a list", "a number", ..."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Counting what is skipped, and why


class BadRecords:
    """Counts records skipped under `skip_bad=True`, by reason, with examples.

    `count` and `locations`/`problems` (the first KEEP, in file order) are what callers and
    meta.json have always used; `reasons` counts each kind of problem and `examples` keeps up
    to EXAMPLES "file:line: problem" lines of each, so a report can say why. The examples of a
    reason come from as many files as possible (the first bad record of each file), and only
    then from the first records: a folder of differently shaped files needs a different fix
    (a different --text-field) per file, which the first file's examples alone would hide."""

    KEEP = 5
    EXAMPLES = 3

    def __init__(self) -> None:
        self.count = 0
        self.locations: list[str] = []  # "path:line" of the first KEEP bad records
        self.problems: list[str] = []   # the matching one-line messages
        self.reasons: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self._example_files: dict[str, list[str]] = {}  # reason -> file of each example

    def add(self, location: str, problem: str, reason: str | None = None) -> None:
        self.count += 1
        reason = reason or reason_of(problem)
        self.reasons[reason] += 1
        message = f"{location}: {problem}"
        shown = self.examples.setdefault(reason, [])
        files = self._example_files.setdefault(reason, [])
        file = file_of(location)
        if len(shown) < self.EXAMPLES:
            shown.append(message)
            files.append(file)
        elif file not in files:
            # A file without an example yet takes the place of the latest example of a file
            # that has several (never a file's first), so the examples stay in file order.
            for i in reversed(range(len(files))):
                if files.count(files[i]) > 1:
                    del shown[i], files[i]
                    shown.append(message)
                    files.append(file)
                    break
        if len(self.locations) < self.KEEP:
            self.locations.append(location)
            self.problems.append(message)

    def summary(self) -> str:
        """One line: how many were skipped, and per reason how many, the first example and the
        first example of each other file (each with its own suggestion)."""
        if self.count == 0:
            return "no bad records"
        why = "; ".join(f"{n:,} {reason} ({self._first_examples(reason)})"
                        for reason, n in self.reasons.most_common())
        return f"{self.count:,} bad record{'s' if self.count != 1 else ''} skipped: {why}"

    def _first_examples(self, reason: str) -> str:
        shown, files = self.examples[reason], self._example_files[reason]
        others = [example for k, example in enumerate(shown)
                  if k and files[k] not in files[:k]]
        return f"first: {shown[0]}" + (f"; in other files: {'; '.join(others)}" if others else "")

    def report_lines(self) -> list[str]:
        """Markdown list items: each reason with its count and its examples."""
        lines = []
        for reason, n in self.reasons.most_common():
            lines.append(f"- {n:,} × {reason}, e.g.:")
            lines += [f"  - {example}" for example in self.examples[reason]]
        return lines

    def to_dict(self) -> dict:
        return {"count": self.count, "locations": list(self.locations),
                "problems": list(self.problems),
                "reasons": {reason: {"count": n, "examples": list(self.examples[reason])}
                            for reason, n in self.reasons.most_common()}}


# The part of a location after its file: ":12", ": item 3", ":train record 3", ":1 (id 10303)".
_AFTER_FILE = re.compile(r":(?: ?item \d+|[^:]*record \d+|\d+)(?: \(id .*\))?$")


def file_of(location: str) -> str:
    """The file part of a record's location ("a/b.jsonl:12" -> "a/b.jsonl"); the whole
    location when it has no recognisable line or record part."""
    return _AFTER_FILE.sub("", location)


_DETAIL = re.compile(r" \(fields?: .*| \(columns?: .*|: .*|; .*")


def reason_of(problem: str) -> str:
    """The kind of a problem, for counting: its text without the details that differ from
    record to record ("no 'text' field (fields: a, b)" -> "no 'text' field", numbers -> N)."""
    return re.sub(r"\d+", "N", _DETAIL.sub("", problem)).strip() or problem


class Reporter:
    """Raises a bad record as `UserError("where: problem")`, or counts it when `skip_bad`."""

    def __init__(self, skip_bad: bool, bad: BadRecords | None) -> None:
        self.skip_bad = skip_bad
        self.bad = bad if bad is not None else BadRecords()

    def __call__(self, location: str, problem: str, reason: str | None = None) -> None:
        if not self.skip_bad:
            raise UserError(f"{location}: {problem}")
        self.bad.add(location, problem, reason)


# ---------------------------------------------------------------------------------------------
# Files and lines


def file_kind(path: Path, kinds: dict[str, str]) -> str | None:
    """The reader name `kinds` gives the file's extension; `.gz` files go by the inner one."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        return kinds.get(suffixes[-2]) if len(suffixes) >= 2 else None
    return kinds.get(path.suffix.lower())


def source_files(source, kinds: dict[str, str], supported: str) -> list[tuple[Path, str | None]]:
    """(file, split) pairs of a source: a file, `file.json#split` (the list under key `split`)
    or a directory (every file with a kind in `kinds`, hidden ones left out, sorted). Raises
    UserError for a missing path, an unsupported file, an empty directory or a #split of a
    file that is not .json; `supported` lists the kinds in those messages."""
    path, split = Path(source), None
    if not path.exists() and "#" in str(source):
        base, split = str(source).rsplit("#", 1)
        path = Path(base)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and file_kind(p, kinds) is not None)
        if not files:
            raise UserError(f"{path}: directory holds no supported files ({supported})")
        return [(f, split) for f in files]
    kind = file_kind(path, kinds)
    if kind is None:
        raise UserError(f"{path}: unsupported file type '{''.join(path.suffixes) or path.name}'"
                        f" (supported: {supported})")
    if split is not None and kind != "json":
        raise UserError(f"{path}#{split}: '#{split}' selects a list of a .json file")
    return [(path, split)]


def open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed when it ends in .gz."""
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def lines(path: Path, whole: bool = False) -> Iterator[Record]:
    """A Record per line (blank ones included), the text without its newline; a line that is
    not UTF-8 is an Unreadable naming the byte, its offset and its column.

    Decoding line by line rather than in text mode is what lets an encoding error name its
    line. With `whole=True` the file is decoded at once by `read_text`, which raises
    `UserError("file:line: not UTF-8 text ...")` for the first bad byte."""
    if whole:
        for n, line in enumerate(read_text(path).split("\n"), 1):
            yield Record(f"{path}:{n}", line.rstrip("\r"), n, n)
        return
    offset = 0  # byte offset of the current line's start within the (uncompressed) file
    with open_binary(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = (f"not UTF-8: byte 0x{raw[e.start]:02x} at byte offset "
                           f"{offset + e.start} (column {e.start + 1} of the line); re-encode the "
                           f"file as UTF-8 (e.g. iconv -f GBK -t UTF-8)")
                offset += len(raw)
                yield Record(f"{path}:{n}", Unreadable(problem, "not UTF-8"), n, n)
                continue
            offset += len(raw)
            if n == 1 and line.startswith("\ufeff"):  # a BOM left by some Windows editors
                line = line[1:]
            yield Record(f"{path}:{n}", line.rstrip("\r\n"), n, n)


def invalid_json(e: json.JSONDecodeError) -> Unreadable:
    return Unreadable(f"invalid JSON: {e.msg} (column {e.colno})", "invalid JSON")


def jsonl_records(path: Path, whole: bool = False) -> Iterator[Record]:
    """A Record per non-blank line of a JSON-lines file: the parsed value, or an Unreadable."""
    for record in lines(path, whole):
        if isinstance(record.value, Unreadable):
            yield record
        elif record.value.strip():
            try:
                record.value = json.loads(record.value)
            except json.JSONDecodeError as e:
                record.value = invalid_json(e)
            yield record


def load_json(path: Path) -> Any:
    """The one JSON value of a .json file. Raises UserError `file:line: invalid JSON: ...`."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


def json_or_lines(path: Path) -> tuple[str, Any]:
    """("json", value) for a .json file, or ("jsonl", None) when it holds one JSON value per
    line, as RedGPT-Dataset-V1-CN ships under a .json name. Raises UserError for invalid JSON,
    trailing garbage included."""
    text = read_text(path)
    try:
        return "json", json.loads(text) if text.strip() else None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and is_json(text.split("\n", 1)[0]):
            return "jsonl", None
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


def is_json(text: str) -> bool:
    """Whether `text` is one JSON value (a .json file holding JSON lines starts with one)."""
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def item_lines(path: Path, top: list | dict) -> list[int]:
    """The line on which each item of a loaded JSON list (or each entry of an object) starts.

    json.loads keeps no positions, so the (valid) text is walked again with raw_decode."""
    text = read_text(path)
    decoder = json.JSONDecoder()
    pos = text.index("[" if isinstance(top, list) else "{") + 1
    line = 1 + text.count("\n", 0, pos)
    out = []
    for _ in range(len(top)):
        start = pos
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", start, pos)
        out.append(line)
        start = pos
        if isinstance(top, dict):  # "key": value
            _, pos = decoder.raw_decode(text, pos)
            while text[pos] in " \t\r\n:":
                pos += 1
        _, pos = decoder.raw_decode(text, pos)
        line += text.count("\n", start, pos)
    return out


def keyed_by_id(top) -> bool:
    """Whether a JSON object is a set of records keyed by id: {"11290": {...}, ...}."""
    return isinstance(top, dict) and bool(top) and all(isinstance(v, dict) for v in top.values())


def id_records(path: Path, top: dict) -> Iterator[Record]:
    """The records of a JSON object keyed by ids, each at its line, its id in `key`.

    Where several records start on one line (the whole object written on one line, as
    json.dump writes it by default) the line alone does not tell them apart, so their location
    names the id too: "file:1 (id 10303)"."""
    starts = item_lines(path, top)
    shared = {line for line, n in Counter(starts).items() if n > 1}
    for line, (key, value) in zip(starts, top.items()):
        where = f"{path}:{line} (id {key})" if line in shared else f"{path}:{line}"
        yield Record(where, value, line, line, key=str(key))


def csv_rows(path: Path, whole: bool = False) -> Iterator[Record]:
    """A Record per CSV row (a list of strings; blank rows skipped), from the line it starts on
    to the line it ends on; undecodable lines and malformed rows come as Unreadables.

    csv.reader reads our decoded lines, so line numbers and encoding errors stay exact even
    for quoted fields spanning lines. A quote that is never closed would swallow the rest of
    the file into one field without a word from csv; that row is an Unreadable ("unclosed
    quote") instead."""
    # Documents and answers can be far longer than csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    unreadable: list[Record] = []
    ran_out = []  # becomes [True] once csv has asked for a line past the last one

    def text_lines():
        for record in lines(path, whole):
            if isinstance(record.value, Unreadable):
                unreadable.append(record)
                yield "\n"  # keeps csv's line count in step with the file
            else:
                yield record.value + "\n"
        ran_out.append(True)

    reader = csv.reader(text_lines())
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            yield from unreadable
            return
        except csv.Error as e:
            row = Unreadable(f"malformed CSV: {e}", "malformed CSV")
        if ran_out and not isinstance(row, Unreadable):
            # Every line fed to csv ends in a newline, which ends a row unless it is inside
            # quotes; so a row that csv finished only because the lines ran out was still in
            # a quoted field (csv's non-strict mode returns it rather than raising).
            row = Unreadable("unclosed quote (the quoted field runs to the end of the file)",
                             "unclosed quote")
        yield from unreadable
        unreadable.clear()
        if isinstance(row, Unreadable) or any(cell.strip() for cell in row):
            yield Record(f"{path}:{start}", row, start, reader.line_num)


def tsv_rows(path: Path, whole: bool = False) -> Iterator[Record]:
    """A Record per non-blank line of a tab-separated file: its fields, split on tabs.

    TSV files are not quoted (a `"` in an abstract is just a character), so they are split on
    tabs rather than read with the csv module."""
    for record in lines(path, whole):
        if isinstance(record.value, Unreadable):
            yield record
        elif record.value.strip():
            record.value = record.value.split("\t")
            yield record


def parquet_column(path: Path, column: str) -> Iterator[Record]:
    """A Record per row of one column of a parquet file (`where` is file:row), streamed by row
    group. Raises UserError when pyarrow is missing, the file is damaged or has no such column
    (naming the columns: choose one with --text-field)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs pyarrow: pip install 'babyllama[parquet]'"
                        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid & co. for a damaged file
        raise UserError(f"{path}: not a readable parquet file: {e}") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise UserError(f"{path}:1: no column '{column}' (columns: {', '.join(names)}); "
                        f"choose one with --text-field")
    row = 0
    # Row-group batches keep memory bounded however large the file is.
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield Record(f"{path}:{row}", value, row, row)


def yaml_value(path: Path) -> tuple[Any, Any]:
    """(plain value, composed root node) of a YAML file: every scalar a string, as YAML's
    BaseLoader keeps them (`- 1984` or `- yes` in a conversation is text, not a number or a
    boolean); the node gives line numbers. Raises UserError for invalid YAML."""
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
    return (None, None) if root is None else (_plain(root), root)


def yaml_item_lines(root, key: str | None) -> list[int]:
    """Lines of the items of the YAML sequence at `key` of the root (the root itself if None)."""
    import yaml

    node = root if key is None else next(v for k, v in root.value if k.value == key)
    if isinstance(node, yaml.SequenceNode):
        return [n.start_mark.line + 1 for n in node.value]
    return [node.start_mark.line + 1]  # a single record


def _plain(node):
    import yaml

    if isinstance(node, yaml.ScalarNode):
        return node.value
    if isinstance(node, yaml.SequenceNode):
        return [_plain(n) for n in node.value]
    return {_plain(k): _plain(v) for k, v in node.value}


def first_unreadable(records, raise_as: Callable[[Record], str] | None = None):
    """Pass records through, raising UserError at the first Unreadable (strict readers)."""
    for record in records:
        if isinstance(record.value, Unreadable):
            problem = raise_as(record) if raise_as else record.value.problem
            raise UserError(f"{record.where}: {problem}")
        yield record


def json_list_records(path: Path, items: str = "objects",
                      raise_as: Callable[[Record], str] | None = None) -> list[Record]:
    """The records of a .jsonl file (the first unreadable line raises, worded by `raise_as`),
    or of a .json list, each located by the line its item starts on. Raises UserError
    `file:1: expected a JSON list of <items>` when a .json holds something else."""
    if path.suffix.lower() == ".jsonl":
        return list(first_unreadable(jsonl_records(path, whole=True), raise_as))
    value = load_json(path)
    if not isinstance(value, list):
        raise UserError(f"{where(path, 1)}: expected a JSON list of {items}, found {type(value).__name__}")
    return [Record(where(path, line), item, line) for line, item in zip(item_lines(path, value), value)]


def lcsts_records(path: Path) -> Iterator[Record]:
    """LCSTS's original PART_*.txt: <doc> blocks, each a <summary> then a <short_text>, every
    tag and text on a line of its own. A Record {"summary", "text"} per block, at the line of
    its <summary>; a block missing either is an Unreadable."""
    text = read_text(path)
    starts = [m.start() for m in re.finditer(r"<summary>", text)]
    line, last = 1, 0
    for k, start in enumerate(starts):
        line += text.count("\n", last, start)
        last = start
        block = text[start:starts[k + 1] if k + 1 < len(starts) else len(text)]
        summary = re.match(r"<summary>(.*?)</summary>", block, re.S)
        short = re.search(r"<short_text>(.*?)</short_text>", block, re.S)
        if not summary or not short:
            value = Unreadable("expected <summary> ... </summary> followed by <short_text> ... "
                               "</short_text>", "malformed LCSTS block")
        else:
            value = {"summary": summary.group(1), "text": short.group(1)}
        yield Record(f"{path}:{line}", value, line, line)


def is_lcsts_text(path: Path) -> bool:
    """Whether a .txt file is LCSTS's tagged format (it holds a <summary> tag)."""
    return "<summary>" in read_text(path)
