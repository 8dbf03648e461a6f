"""Read documents (plain strings) out of the corpus formats people actually have.

`iter_documents(source)` yields one string per document from a `.txt` (one per non-empty line),
`.jsonl`, `.json` (a list), `.parquet` or `.csv` file, a gzip-compressed `.txt.gz` / `.jsonl.gz`
/ `.json.gz` / `.csv.gz`, a directory holding such files, or a built-in corpus
(`builtin:peoples-daily`, `builtin:reviews`).

Bad input is a user mistake, not a bug: it raises `UserError("file:line: problem")` with the
line number (and byte offset for encoding errors), so a user can open the file at the spot.
With `skip_bad=True` a malformed record is skipped and counted in a `BadRecords` instead;
empty or whitespace-only documents are always skipped silently (they are not errors).
"""

from __future__ import annotations

import csv
import gzip
import json
import sys
from pathlib import Path
from typing import IO, Iterable, Iterator

from babyllama.errors import UserError

# Extensions by the reader that handles them; `.gz` variants are matched on the inner suffix.
READERS_BY_SUFFIX = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet",
                     ".csv": "csv"}
SUPPORTED = ".txt, .jsonl, .json, .parquet, .csv (and .txt.gz, .jsonl.gz, .json.gz, .csv.gz)"
BUILTIN_PREFIX = "builtin:"


class BadRecords:
    """Counts records skipped under `skip_bad=True` and remembers where the first few were."""

    KEEP = 5

    def __init__(self) -> None:
        self.count = 0
        self.locations: list[str] = []  # "path:line" of the first KEEP bad records
        self.problems: list[str] = []   # the matching one-line messages

    def add(self, location: str, problem: str) -> None:
        self.count += 1
        if len(self.locations) < self.KEEP:
            self.locations.append(location)
            self.problems.append(f"{location}: {problem}")

    def summary(self) -> str:
        if self.count == 0:
            return "no bad records"
        first = "; ".join(self.problems[:2])
        return f"{self.count} bad record{'s' if self.count != 1 else ''} skipped (first: {first})"

    def to_dict(self) -> dict:
        return {"count": self.count, "locations": list(self.locations),
                "problems": list(self.problems)}


class _Reporter:
    """Raises or counts a bad record, depending on skip_bad."""

    def __init__(self, skip_bad: bool, bad: BadRecords | None) -> None:
        self.skip_bad = skip_bad
        self.bad = bad if bad is not None else BadRecords()

    def __call__(self, location: str, problem: str) -> None:
        if not self.skip_bad:
            raise UserError(f"{location}: {problem}")
        self.bad.add(location, problem)


def iter_documents(source, text_field: str = "text", skip_bad: bool = False,
                   bad: BadRecords | None = None) -> Iterator[str]:
    """Yield the documents of one source (path, directory or `builtin:NAME`) in file order."""
    report = _Reporter(skip_bad, bad)
    if isinstance(source, str) and source.startswith(BUILTIN_PREFIX):
        from babyllama.data.builtin import iter_builtin
        yield from iter_builtin(source)
        return
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        files = _files_in(path)
        if not files:
            raise UserError(f"{path}: directory holds no supported files ({SUPPORTED})")
    else:
        files = [path]
    for file in files:
        for text in _iter_file(file, text_field, report):
            # Whitespace-only documents carry nothing to learn from; skipping them is not an error.
            if text.strip():
                yield text


def iter_sources(sources, text_field: str = "text", skip_bad: bool = False,
                 bad: BadRecords | None = None) -> Iterator[str]:
    """All documents of several sources, one after the other."""
    for source in as_source_list(sources):
        yield from iter_documents(source, text_field=text_field, skip_bad=skip_bad, bad=bad)


def as_source_list(sources) -> list:
    """A single path/str or a list of them -> a list (a str is one source, not characters)."""
    if isinstance(sources, (str, Path)):
        return [sources]
    return list(sources)


def require_documents(documents: Iterable[str], sources,
                      bad: BadRecords | None = None) -> Iterator[str]:
    """Pass documents through; raise `empty corpus` at the end if there were none at all.

    A single empty file is fine as long as another source has documents, so the check can
    only be made once every source has been read.
    """
    n = 0
    for doc in documents:
        n += 1
        yield doc
    if n == 0:
        names = ", ".join(str(s) for s in as_source_list(sources))
        skipped = f" ({bad.summary()})" if bad is not None and bad.count else ""
        raise UserError(f"empty corpus: {names} holds no non-empty documents{skipped}")


def _files_in(directory: Path) -> list[Path]:
    """Supported files below a directory, sorted so the document order is reproducible.
    Hidden files and, as in Hadoop/Spark output folders, files starting with "_" (metadata such
    as `babyllama clean`'s _report.json) are not documents."""
    files = [p for p in directory.rglob("*")
             if p.is_file() and not p.name.startswith((".", "_")) and _kind(p) is not None]
    return sorted(files)


def _kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        inner = suffixes[-2] if len(suffixes) >= 2 else ""
        return READERS_BY_SUFFIX.get(inner) if inner != ".parquet" else None
    return READERS_BY_SUFFIX.get(path.suffix.lower())


def _iter_file(path: Path, text_field: str, report: _Reporter) -> Iterator[str]:
    kind = _kind(path)
    if kind is None:
        raise UserError(f"{path}: unsupported file type '{''.join(path.suffixes) or path.name}'"
                        f" (supported: {SUPPORTED})")
    if kind == "parquet":
        yield from _read_parquet(path, text_field, report)
        return
    with _open_binary(path) as f:
        if kind == "txt":
            yield from _read_txt(path, f, report)
        elif kind == "jsonl":
            yield from _read_jsonl(path, f, text_field, report)
        elif kind == "json":
            yield from _read_json(path, f, text_field, report)
        else:
            yield from _read_csv(path, f, text_field, report)


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _decoded_lines(path: Path, f: IO[bytes], report: _Reporter) -> Iterator[tuple[int, str]]:
    """(line number, text without newline) for each line, decoding strictly line by line.

    Decoding per line (rather than opening in text mode) is what lets an encoding error name
    its line and byte offset; a line that is not UTF-8 is a bad record.
    """
    offset = 0  # byte offset of the current line's start within the (uncompressed) file
    for lineno, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            byte = raw[e.start]
            report(f"{path}:{lineno}", f"not UTF-8: byte 0x{byte:02x} at byte offset "
                   f"{offset + e.start} (column {e.start + 1} of the line); re-encode the file "
                   f"as UTF-8 (e.g. iconv -f GBK -t UTF-8)")
            offset += len(raw)
            continue
        offset += len(raw)
        if lineno == 1 and line.startswith("\ufeff"):  # a BOM left by some Windows editors
            line = line[1:]
        yield lineno, line.rstrip("\r\n")


def _read_txt(path: Path, f: IO[bytes], report: _Reporter) -> Iterator[str]:
    for _, line in _decoded_lines(path, f, report):
        yield line


def _read_jsonl(path: Path, f: IO[bytes], text_field: str, report: _Reporter) -> Iterator[str]:
    for lineno, line in _decoded_lines(path, f, report):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            report(where, f"invalid JSON: {e.msg} (column {e.colno})")
            continue
        text = _text_of(record, text_field, where, report)
        if text is not None:
            yield text


def _read_json(path: Path, f: IO[bytes], text_field: str, report: _Reporter) -> Iterator[str]:
    # A .json file is one JSON value, so it has to be loaded whole; corpora too large for memory
    # should be .jsonl or .parquet, which stream.
    data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{lineno}: not UTF-8: byte 0x{data[e.start]:02x} at byte offset "
                        f"{e.start}; re-encode the file as UTF-8") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(items, list):
        raise UserError(f"{path}:1: expected a JSON list of objects or strings, "
                        f"found {type(items).__name__}")
    for i, record in enumerate(items, 1):
        # json.loads keeps no positions, so items are located by their 1-based index.
        value = _text_of(record, text_field, f"{path}: item {i}", report)
        if value is not None:
            yield value


def _read_csv(path: Path, f: IO[bytes], text_field: str, report: _Reporter) -> Iterator[str]:
    # Documents can be far longer than csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # csv.reader accepts any iterable of lines; feeding it our decoded lines keeps line numbers
    # and encoding errors exact even for quoted fields that span lines.
    lines = (line + "\n" for _, line in _decoded_lines(path, f, report))
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    if header is None:
        return
    if text_field not in header:
        raise UserError(f"{path}:1: no column '{text_field}' (columns: {', '.join(header)}); "
                        f"choose one with --text-field")
    column = header.index(text_field)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            report(f"{path}:{reader.line_num}", f"malformed CSV: {e}")
            continue
        if not row:
            continue
        if column >= len(row):
            report(f"{path}:{reader.line_num}",
                   f"row has {len(row)} fields, no value for column '{text_field}'")
            continue
        yield row[column]


def _read_parquet(path: Path, text_field: str, report: _Reporter) -> Iterator[str]:
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
    if text_field not in names:
        raise UserError(f"{path}:1: no column '{text_field}' (columns: {', '.join(names)}); "
                        f"choose one with --text-field")
    row = 0
    # Row-group batches keep memory bounded however large the file is.
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, str):
                yield value
            elif value is None:
                report(f"{path}:{row}", f"row {row}: '{text_field}' is null")
            else:
                report(f"{path}:{row}",
                       f"row {row}: '{text_field}' is {type(value).__name__}, not a string")


def _text_of(record, text_field: str, where: str, report: _Reporter) -> str | None:
    """The text of one JSON record (an object with text_field, or a bare string), or None."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        report(where, f"expected a JSON object or string, found {_json_type(record)}")
        return None
    if text_field not in record:
        fields = ", ".join(list(record)[:10]) or "none"
        report(where, f"no '{text_field}' field (fields: {fields}); choose one with --text-field")
        return None
    value = record[text_field]
    if not isinstance(value, str):
        report(where, f"'{text_field}' is {_json_type(value)}, not a string")
        return None
    return value


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
