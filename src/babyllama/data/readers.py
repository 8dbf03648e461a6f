"""Read documents (plain strings) out of the corpus formats people actually have.

`iter_documents(source)` yields one string per document from a `.txt` (one per non-empty line),
`.jsonl`, `.json` (a list), `.parquet` or `.csv` file, a gzip-compressed `.txt.gz` / `.jsonl.gz`
/ `.json.gz` / `.csv.gz`, a directory holding such files, or a built-in corpus
(`builtin:peoples-daily`, `builtin:reviews`). The files are read by `data/records.py`.

Bad input is a user mistake, not a bug: it raises `UserError("file:line: problem")` with the
line number (and byte offset for encoding errors), so a user can open the file at the spot.
With `skip_bad=True` a malformed record is skipped and counted in a `BadRecords` instead, by
reason; a record without the text field names its fields and the `--text-field` that would
read it. Empty or whitespace-only documents are always skipped silently (they are not errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from babyllama.data.builtin import iter_builtin
from babyllama.data.records import (BadRecords, Record, Reporter, Unreadable, csv_rows, file_kind,
                                    json_or_lines, json_type, jsonl_records, lines,
                                    parquet_column)
from babyllama.errors import UserError

# Extensions by the reader that handles them; `.gz` variants are matched on the inner suffix.
READERS_BY_SUFFIX = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet",
                     ".csv": "csv"}
SUPPORTED = ".txt, .jsonl, .json, .parquet, .csv (and .txt.gz, .jsonl.gz, .json.gz, .csv.gz)"
BUILTIN_PREFIX = "builtin:"
# Fields that hold a document's text in common data sets, in the order --text-field is
# suggested when a record has no `text` (alpaca-style sets: `output`).
TEXT_LIKE = ("content", "output", "response", "answer", "completion", "target", "body",
             "article", "document", "passage", "abstract", "summary", "text")

__all__ = ["BUILTIN_PREFIX", "BadRecords", "READERS_BY_SUFFIX", "SUPPORTED", "as_source_list",
           "iter_documents", "iter_sources", "require_documents", "suggest_text_field"]


def iter_documents(source, text_field: str = "text", skip_bad: bool = False,
                   bad: BadRecords | None = None) -> Iterator[str]:
    """Yield the documents of one source (path, directory or `builtin:NAME`) in file order.

    Raises UserError for a missing or unsupported file and, unless `skip_bad`, for the first
    bad record (`file:line: problem`); with `skip_bad` bad records are counted in `bad`."""
    report = Reporter(skip_bad, bad)
    if isinstance(source, str) and source.startswith(BUILTIN_PREFIX):
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


def suggest_text_field(record: dict) -> str | None:
    """The field of a record most likely to hold its text: a common text field name holding a
    string, else the longest string value; None if no field holds a string."""
    strings = {k: v for k, v in record.items() if isinstance(v, str) and v.strip()}
    for name in TEXT_LIKE:
        if name in strings:
            return name
    return max(strings, key=lambda k: len(strings[k]), default=None)


def _files_in(directory: Path) -> list[Path]:
    """Supported files below a directory, sorted so the document order is reproducible.
    Hidden files and, as in Hadoop/Spark output folders, files starting with "_" (metadata such
    as `babyllama clean`'s _report.json) are not documents."""
    files = [p for p in directory.rglob("*")
             if p.is_file() and not p.name.startswith((".", "_")) and _kind(p) is not None]
    return sorted(files)


def _kind(path: Path) -> str | None:
    kind = file_kind(path, READERS_BY_SUFFIX)
    return None if kind == "parquet" and path.suffix.lower() == ".gz" else kind


def _iter_file(path: Path, text_field: str, report: Reporter) -> Iterator[str]:
    kind = _kind(path)
    if kind is None:
        raise UserError(f"{path}: unsupported file type '{''.join(path.suffixes) or path.name}'"
                        f" (supported: {SUPPORTED})")
    if kind == "parquet":
        records = parquet_column(path, text_field)
    elif kind == "txt":
        records = lines(path)
    elif kind == "jsonl":
        records = jsonl_records(path)
    elif kind == "json":
        records = _json_items(path)
    else:
        records = _csv_texts(path, text_field)
    for record in records:
        text = _text_of(record, text_field, kind, report)
        if text is not None:
            yield text


def _json_items(path: Path) -> Iterator[Record]:
    # A .json file is one JSON value, so it has to be loaded whole; corpora too large for memory
    # should be .jsonl or .parquet, which stream.
    shape, items = json_or_lines(path)
    if shape == "jsonl":
        yield from jsonl_records(path)
        return
    if items is None:
        return
    if not isinstance(items, list):
        raise UserError(f"{path}:1: expected a JSON list of objects or strings, "
                        f"found {type(items).__name__}")
    for i, item in enumerate(items, 1):
        # json.loads keeps no positions, so items are located by their 1-based index.
        yield Record(f"{path}: item {i}", item)


def _csv_texts(path: Path, text_field: str) -> Iterator[Record]:
    """The text column of each row. Raises UserError when the header has no such column (a
    whole file, not a record, so --skip-bad-records does not skip it)."""
    column = None
    rows = csv_rows(path)
    for record in rows:
        row = record.value
        if isinstance(row, Unreadable):
            yield record
        elif column is None:
            if text_field not in row:
                raise UserError(f"{path}:1: no column '{text_field}' (columns: {', '.join(row)});"
                                f" choose one with --text-field{_column_hint(row, rows)}")
            column = row.index(text_field)
        elif column >= len(row):
            record.value = Unreadable(f"row has {len(row)} fields, no value for column "
                                      f"'{text_field}'", "row too short")
            yield record
        else:
            record.value = row[column]
            yield record


def _column_hint(header: list[str], rows: Iterator[Record]) -> str:
    """", e.g. --text-field target": the column suggest_text_field picks from the header and
    the first readable data row, as for a JSON record; by name alone when there is no row."""
    first = next((r.value for r in rows if isinstance(r.value, list)), None)
    if first is not None:
        suggested = suggest_text_field(dict(zip(header, first)))
    else:
        suggested = next((name for name in TEXT_LIKE if name in header), None)
    return f", e.g. --text-field {suggested}" if suggested else ""


def _text_of(record: Record, text_field: str, kind: str, report: Reporter) -> str | None:
    """The text of one record (an object with text_field, or a bare string), or None."""
    value = record.value
    if isinstance(value, Unreadable):
        report(record.where, value.problem, value.reason)
        return None
    if isinstance(value, str):
        return value
    if kind == "parquet":
        what = "null" if value is None else f"{type(value).__name__}, not a string"
        report(record.where, f"row {record.line}: '{text_field}' is {what}",
               f"'{text_field}' is not a string")
        return None
    if not isinstance(value, dict):
        report(record.where, f"expected a JSON object or string, found {json_type(value)}",
               "not a JSON object or string")
        return None
    if text_field not in value:
        fields = ", ".join(list(value)[:10]) or "none"
        suggested = suggest_text_field(value)
        hint = f", e.g. --text-field {suggested}" if suggested else ""
        report(record.where, f"no '{text_field}' field (fields: {fields}); choose one with "
               f"--text-field{hint}", f"no '{text_field}' field")
        return None
    text = value[text_field]
    if not isinstance(text, str):
        report(record.where, f"'{text_field}' is {json_type(text)}, not a string",
               f"'{text_field}' is not a string")
        return None
    return text
