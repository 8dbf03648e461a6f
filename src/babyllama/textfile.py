"""Reading whole text and JSON files: UTF-8 with or without a byte-order mark, and every
failure one line naming the file (and the line).

Windows tools write UTF-8 with a BOM (Notepad before 2019, PowerShell 5's
`Out-File -Encoding utf8`, Excel's "CSV UTF-8"), and Chinese users edit `config.json`,
`tokenizer_config.json`, chat templates and documents with them. `json.loads` refuses text that
starts with U+FEFF and `str.strip()` keeps it (WangRongsheng/MedQA-ChatGLM#2,
minimaxir/gpt-2-simple#263), so a leading BOM is dropped before decoding. Every small text or JSON file the package reads goes through
`read_text` / `read_json` (corpora stream through `data/readers.py` and `data/encoding.py`,
which drop a BOM too); a test holds the package to it.
"""

from __future__ import annotations

import codecs
import gzip
import json
from pathlib import Path
from typing import Any

from babyllama.errors import UserError


def read_text(path: str | Path) -> str:
    """The whole file as text (a `.gz` file is decompressed), without a leading BOM.

    Raises UserError: `PATH: no such file`, `PATH: cannot read (...)`, or
    `PATH:LINE: not UTF-8 text: byte 0xNN at byte offset N; save the file as UTF-8`."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, EOFError) as e:  # a directory, no permission, a corrupt .gz stream
        raise UserError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    # The BOM is cut here rather than by the utf-8-sig codec, whose error positions would then
    # count from after it.
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = raw.count(b"\n", 0, offset) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text: byte 0x{raw[offset]:02x} at byte offset "
                        f"{offset}; save the file as UTF-8") from None


def read_json(path: str | Path, what: str = "JSON") -> Any:
    """The file's one JSON value (`read_text` first, so a BOM is fine).

    Raises UserError as `read_text`, or `PATH:LINE: not valid {what} (message, column N)`."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid {what} ({e.msg}, column {e.colno})") from None


def read_json_object(path: str | Path, what: str = "JSON") -> dict:
    """`read_json` of a file that must hold a JSON object (config files)."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
