"""Reading raw text files of unknown encoding, line by line, without ever crashing on content.

Chinese corpora arrive as UTF-8 (with or without a BOM), GBK/GB2312/GB18030, Big5, sometimes
UTF-16 from Windows tools, gzip-compressed, with a stray binary file or a 2 GB one-line JSON dump
in the same directory. The cleaning pipeline must get through all of it and say what it skipped:

    tf = TextFile("corpus/part-0001.txt.gz", max_line_bytes=16 << 20)
    if tf.skipped:                    # "empty", "binary", "unknown_encoding", "unreadable"
        ...                           # count the file and move on; lines() yields nothing
    for lineno, line in tf.lines():   # 1-based line numbers, newline removed
        ...
    tf.encoding                       # "utf-8", "utf-8-sig", "gb18030", "big5", "utf-16", ...
    tf.stats                          # {"lines", "bad_lines", "long_lines", "truncated"}

`TextFile` holds no open handle between calls (it is picklable); `lines()` opens the file, and
calling it again starts over with fresh stats. `stats["lines"]` counts the lines yielded
(blank ones included), `bad_lines` lines that do not decode in the file's encoding,
`long_lines` lines longer than `max_line_bytes`, `truncated` is 1 when a .gz stream ends early.
`skipped` is "unreadable" for a corrupt .gz or a file without read permission; a path that
does not exist (or is a directory) is a user mistake and raises UserError, as everywhere else.

Choices:
- Detection reads the first 64 KB only (`detect_encoding`). A BOM decides; then UTF-8, also when
  only a few sequences are invalid (one bad line must not make a whole UTF-8 file decode as
  GB18030 mojibake); then charset-normalizer restricted to Chinese encodings, where GBK and
  GB2312 become GB18030 (a strict superset that also covers rare characters). NUL bytes mean
  binary (UTF-16/32 always carry a BOM in practice; without one they count as binary); bytes
  that no Chinese encoding fits (Latin-1, Shift-JIS, ...) are "unknown_encoding".
- Lines are split on b"\\n" in bytes before decoding, which is safe in every supported encoding
  (no multi-byte GB18030 or Big5 character contains the byte 0x0A), so a bad line costs only
  itself: it is skipped and counted, and the next line decodes normally.
- `readline(limit)` bounds memory: a line longer than `max_line_bytes` is read no further than
  that, the rest of it is discarded in 1 MB pieces, and it is counted in `long_lines`.
"""

from __future__ import annotations

import codecs
import gzip
import io
import zlib
from pathlib import Path
from typing import IO, Iterator

from babyllama.errors import UserError

SAMPLE_BYTES = 64 << 10
DEFAULT_MAX_LINE_BYTES = 16 << 20
# The encodings charset-normalizer may choose from (everything else is out of scope here).
CHINESE_ENCODINGS = ["gb18030", "gbk", "gb2312", "big5", "big5hkscs"]
_AS_GB18030 = {"gbk", "gb2312", "cp936", "gb18030"}
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
# At most one invalid UTF-8 sequence per this many valid non-ASCII characters still counts as
# UTF-8 with a few bad lines. GBK or Big5 text read as UTF-8 is almost all invalid: over the
# first 1000 zhwiki paragraphs in GBK, Big5 and GB18030 the worst document had 0.45 valid
# characters per invalid sequence, ten times below this threshold.
_UTF8_GOOD_PER_BAD = 4


def detect_encoding(sample: bytes) -> str | None:
    """Encoding of a file from its first bytes: "utf-8-sig", "utf-16", "utf-32" (by BOM),
    "utf-8", or the best Chinese encoding ("gb18030", "big5", "big5hkscs"); None for binary
    data (NUL bytes) or when nothing fits."""
    for bom, name in _BOMS:
        if sample.startswith(bom):
            return name
    if b"\0" in sample:
        return None
    if _is_utf8(sample):
        return "utf-8"
    return _detect_chinese(_whole_lines(sample))


def _whole_lines(sample: bytes) -> bytes:
    """The sample without its last, probably cut, line (when there is more than one)."""
    if len(sample) < SAMPLE_BYTES:
        return sample
    cut = sample.rfind(b"\n")
    return sample[:cut + 1] if cut > 0 else sample


def _is_utf8(sample: bytes) -> bool:
    try:
        # final=False: a character cut at the end of the sample is not an error.
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
        return True
    except UnicodeDecodeError:
        pass
    text = _whole_lines(sample).decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    good = len(text) - len(text.encode("ascii", errors="ignore")) - bad
    return good >= _UTF8_GOOD_PER_BAD * bad


def _detect_chinese(sample: bytes) -> str | None:
    try:
        from charset_normalizer import from_bytes
    except ImportError:
        raise UserError("detecting the encoding of non-UTF-8 files needs charset-normalizer: "
                         "pip install 'babyllama[clean]'") from None
    best = from_bytes(sample, cp_isolation=CHINESE_ENCODINGS).best()
    if best is None:
        return None
    name = codecs.lookup(best.encoding).name  # canonical codec name: "gb2312", "big5", ...
    return "gb18030" if name in _AS_GB18030 else name


class TextFile:
    """A text file of unknown encoding (plain or .gz), read line by line; see the module doc."""

    def __init__(self, path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self.path = Path(path)
        self.max_line_bytes = max_line_bytes
        self.encoding: str | None = None
        self.skipped: str | None = None
        self.stats = _new_stats()
        try:
            with self._open() as f:
                sample = f.read(SAMPLE_BYTES)
        except FileNotFoundError:
            raise UserError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise UserError(f"{self.path}: is a directory, not a text file") from None
        except (OSError, EOFError, zlib.error):
            # A corrupt .gz, a file without read permission: skipped and counted like a
            # binary file, so one bad file does not stop a run over thousands.
            self.skipped = "unreadable"
            return
        if not sample:
            self.skipped = "empty"
            return
        self.encoding = detect_encoding(sample)
        if self.encoding is None:
            self.skipped = "binary" if b"\0" in sample else "unknown_encoding"

    def _open(self) -> IO[bytes]:
        if self.path.suffix.lower() == ".gz":
            return gzip.open(self.path, "rb")
        return open(self.path, "rb")

    def lines(self) -> Iterator[tuple[int, str]]:
        """(1-based line number, text without its newline) of every line that decodes; nothing
        for a skipped file. Bad and over-long lines are skipped and counted in `stats`."""
        self.stats = _new_stats()
        if self.skipped is not None:
            return
        try:
            with self._open() as f:
                if self.encoding.startswith(("utf-16", "utf-32")):
                    yield from self._wide_lines(f)
                else:
                    yield from self._byte_lines(f)
        except (EOFError, zlib.error, gzip.BadGzipFile):
            self.stats["truncated"] = 1  # a cut-off .gz: keep what was read before

    def _byte_lines(self, f: IO[bytes]) -> Iterator[tuple[int, str]]:
        limit = self.max_line_bytes + 2  # room for "\r\n" after a line of exactly the maximum
        lineno = 0
        while chunk := f.readline(limit):
            lineno += 1
            if not chunk.endswith(b"\n") and len(chunk) == limit:
                _skip_rest_of_line(f)
                self.stats["long_lines"] += 1
                continue
            line = chunk.rstrip(b"\n").rstrip(b"\r") if chunk.endswith(b"\n") else chunk
            if len(line) > self.max_line_bytes:
                self.stats["long_lines"] += 1
                continue
            try:
                text = line.decode(self.encoding)
            except UnicodeDecodeError:
                self.stats["bad_lines"] += 1
                continue
            self.stats["lines"] += 1
            yield lineno, text

    def _wide_lines(self, f: IO[bytes]) -> Iterator[tuple[int, str]]:
        # UTF-16/32: b"\n" is not a line break in bytes, so lines are split after decoding;
        # undecodable bytes become U+FFFD and such a line is counted as bad.
        text = io.TextIOWrapper(f, encoding=self.encoding, errors="replace")
        limit = self.max_line_bytes // 2 + 2  # characters: at least 2 bytes each
        lineno = 0
        while line := text.readline(limit):
            lineno += 1
            if not line.endswith("\n") and len(line) == limit:
                while (rest := text.readline(1 << 20)) and not rest.endswith("\n"):
                    pass
                self.stats["long_lines"] += 1
                continue
            line = line.rstrip("\n")
            if "\ufffd" in line:
                self.stats["bad_lines"] += 1
                continue
            self.stats["lines"] += 1
            yield lineno, line


def _new_stats() -> dict[str, int]:
    return {"lines": 0, "bad_lines": 0, "long_lines": 0, "truncated": 0}


def _skip_rest_of_line(f: IO[bytes]) -> None:
    """Read past the end of the current line in bounded pieces."""
    while (piece := f.readline(1 << 20)) and not piece.endswith(b"\n"):
        pass


def iter_text_lines(path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
                    ) -> Iterator[tuple[int, str]]:
    """(line number, text) of a text file of any supported encoding; a convenience for callers
    that do not need the stats or the skip reason (use `TextFile` for those)."""
    yield from TextFile(path, max_line_bytes).lines()
