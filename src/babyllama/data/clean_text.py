"""Text-cleaning building blocks: pure functions on one document (a `str`).

The cleaning pipeline (`babyllama.data.clean`) chains them in worker processes, so everything
here is a module-level function of plain strings, and the one heavy object (OpenCC's converter)
is created lazily, once per process.

Transforms (return the new text):
- `normalize_width`: full-width Latin letters and digits -> ASCII (and ＠．＿－／＋ inside an
  ASCII token, so ａ＠ｂ．ｃｏｍ becomes a@b.com), Chinese punctuation untouched. This is the
  default rather than NFKC because NFKC also folds Chinese full-width punctuation (，。：；（）！？)
  into ASCII (, . : ; ( ) ! ?), which is wrong in Chinese running text and would teach the model
  to mix the two; `normalize_nfkc` is there for users who want exactly that.
- `to_simplified`: OpenCC t2s (phrase-aware, unlike a character table).
- `clean_whitespace`: line breaks, control and zero-width characters, runs of spaces, blank lines.
- `strip_html`: tags, scripts, comments and entities, with block tags turned into line breaks.
- `mask_pii`: e-mail addresses and Chinese phone numbers -> `<email>` / `<phone>`.

Measures (floats in [0, 1], used by the filters): `chinese_ratio`, `repeated_line_ratio`,
`junk_ratio`. Filters: `FilterConfig` holds the thresholds and `filter_reason(text, cfg)` names
the first filter a document fails (the names are `FILTERS`, in the order they are tried: cheap
length checks first), or returns None to keep it.

Speed matters (the pipeline runs over gigabytes): every regex is compiled once at import, work
on characters is done in C (`re`, `str.translate`, `in`, and numpy lookup tables for the
character-class counts) rather than in Python loops, and the slower steps are skipped when a
cheap test says there is nothing to do. On zhwiki paragraphs, one core of a busy machine:
strip_html -> normalize_width -> to_simplified -> clean_whitespace -> filter_reason runs at
20-30 MB/s, each step at 60 MB/s (OpenCC) to 150+ MB/s.
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
from dataclasses import dataclass, fields

import numpy as np

from babyllama.errors import UserError

# ---------------------------------------------------------------------------------------------
# Width and Unicode normalization

# U+FF01..U+FF5E are U+0021..U+007E shifted by 0xFEE0. Letters and digits always map.
_WIDTH_TABLE = {c: c - 0xFEE0 for c in range(0xFF10, 0xFF5B)
                if chr(c - 0xFEE0).isascii() and chr(c - 0xFEE0).isalnum()}
# A few symbols that are never Chinese punctuation map only inside an ASCII token, i.e. between
# two ASCII letters or digits once those are converted: ａ＠ｂ．ｃｏｍ -> a@b.com, ３．５ -> 3.5,
# Ａ－１ -> A-1. Elsewhere (．as a sentence end, ／ between Chinese words) they stay.
_INNER_SYMBOLS = "＠．＿－／＋"
_INNER_SYMBOL = re.compile(f"(?<=[0-9A-Za-z])[{_INNER_SYMBOLS}](?=[0-9A-Za-z])")
_INNER_TABLE = {ord(c): ord(c) - 0xFEE0 for c in _INNER_SYMBOLS}
_HAS_FULLWIDTH = re.compile(f"[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a{_INNER_SYMBOLS}]")


def normalize_width(text: str) -> str:
    """Full-width ASCII letters and digits (Ａ１ｂ) -> ASCII (A1b), and ＠．＿－／＋ when inside
    an ASCII token (email, URL, decimal number); Chinese punctuation and U+3000 stay."""
    # translate() looks every character up in a dict (~35 MB/s on Chinese text); most documents
    # have no full-width letters at all, and the search finds that at gigabytes per second.
    if _HAS_FULLWIDTH.search(text) is None:
        return text
    text = text.translate(_WIDTH_TABLE)
    return _INNER_SYMBOL.sub(lambda m: m.group().translate(_INNER_TABLE), text)


def normalize_nfkc(text: str) -> str:
    """Unicode NFKC: full-width punctuation becomes ASCII too (，-> ,), ligatures split, etc."""
    return unicodedata.normalize("NFKC", text)


_t2s = None  # OpenCC converter, created on first use in each process


def to_simplified(text: str) -> str:
    """Traditional -> Simplified Chinese with OpenCC's t2s (phrase-level) conversion."""
    global _t2s
    if _t2s is None:
        try:
            import opencc
        except ImportError:
            raise UserError("converting to simplified Chinese needs opencc: "
                            "pip install 'babyllama[clean]'") from None
        _t2s = opencc.OpenCC("t2s")
    return _t2s.convert(text)


# ---------------------------------------------------------------------------------------------
# Whitespace

# Line and page separators become line breaks rather than vanishing, so the words on either
# side do not get glued together: \v, \f (page breaks in PDF extractions), NEL, U+2028/U+2029.
_LINE_BREAK = re.compile("\r\n?|[\x0b\x0c\x85\u2028\u2029]")
# Other C0/C1 controls, zero-width space/joiners, word joiner, BOM and soft hyphen: invisible
# characters that only split tokens. \n and \t are handled separately.
_INVISIBLE = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\u200b-\u200d\u2060\ufeff]")
# Horizontal spaces: a run of two or more, or any one that is not an ASCII space, becomes one
# ASCII space (a lone " " is left alone, which saves rebuilding English text). U+3000
# (ideographic space) is deliberately not in the class: Chinese text uses it as a full-width
# separator (姓名　张三) and it is kept as is.
_H = "\t\u00a0\u2000-\u200a\u202f\u205f"
_SPACES = re.compile(f"[ {_H}]{{2,}}|[{_H}]")
# Spaces at a line's start or end, including U+3000 paragraph indentation (　　第一章...).
_LINE_EDGE = re.compile("[ \u3000]+\n[ \u3000]*|\n[ \u3000]+")
_BLANK_LINES = re.compile("\n{3,}")
# Any character that one of the rules above changes, other than spaces and line breaks: one
# search (~270 MB/s) decides whether the slower substitutions are needed at all.
_ODD = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200d\u2028\u2029"
                  f"\u2060\ufeff{_H}]")


def clean_whitespace(text: str) -> str:
    """Unify line breaks, drop invisible characters, collapse spaces, strip lines, and keep at
    most one blank line between paragraphs."""
    # Most documents need little of this; `in` tests run at gigabytes per second, a regex
    # pass at ~100 MB/s, so each substitution runs only when its trigger is present.
    odd = _ODD.search(text) is not None
    if odd or "\r" in text:
        text = _LINE_BREAK.sub("\n", text)
        text = _INVISIBLE.sub("", text)
    if odd or "  " in text:
        text = _SPACES.sub(" ", text)
    if " \n" in text or "\n " in text or "\u3000\n" in text or "\n\u3000" in text:
        text = _LINE_EDGE.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip(" \n\u3000")


# ---------------------------------------------------------------------------------------------
# HTML

# Only real HTML element names count as tags, so `List<String>`, `1<2>3` and `a < b` survive.
_BLOCK_TAGS = ("address article aside blockquote body br caption dd div dl dt fieldset figcaption"
               " figure footer form h1 h2 h3 h4 h5 h6 head header hr html li main nav ol p pre"
               " section table tbody tfoot thead title tr ul").split()
_CELL_TAGS = ("td", "th")
_INLINE_TAGS = ("a abbr acronym area audio b base bdi bdo big button canvas center cite code col"
                " colgroup data datalist del details dfn dialog em embed font i iframe img input"
                " ins kbd label legend link map mark meta meter noscript object optgroup option"
                " output param picture progress q rp rt ruby s samp select small source span"
                " strike strong sub summary sup svg template textarea time track tt u var video"
                " wbr").split()
# Attributes: quoted values may hold '>' (onclick="a>b"); the alternatives are disjoint, so the
# pattern cannot backtrack catastrophically.
_ATTRS = r"""(?:\s(?:[^<>"']|"[^"]*"|'[^']*')*)?"""


def _tag_pattern(names) -> re.Pattern:
    alternatives = "|".join(sorted(names, key=len, reverse=True))
    return re.compile(rf"</?(?:{alternatives})(?![\w-]){_ATTRS}/?>", re.IGNORECASE)


_SCRIPT_STYLE = re.compile(r"<(script|style)(?![\w-])[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_DECLARATION = re.compile(r"<![A-Za-z\[][^<>]*>|<\?[A-Za-z][^<>]*\?>")  # <!DOCTYPE>, <?xml?>
_BLOCK = _tag_pattern(_BLOCK_TAGS)
_CELL = _tag_pattern(_CELL_TAGS)
_INLINE = _tag_pattern(_INLINE_TAGS)


def strip_html(text: str) -> str:
    """Remove HTML markup: scripts and styles with their content, comments, and tags (block
    tags -> line break, table cells -> space); then decode entities (&amp; &nbsp; &#x4e2d;).
    Whitespace is left for `clean_whitespace`."""
    if "<" in text:
        text = _SCRIPT_STYLE.sub("", text)
        text = _COMMENT.sub("", text)
        text = _DECLARATION.sub("", text)
        text = _BLOCK.sub("\n", text)
        text = _CELL.sub(" ", text)
        text = _INLINE.sub("", text)
    # Entities last: a decoded "&lt;b&gt;" is text that must not be taken for a tag.
    return html.unescape(text) if "&" in text else text


# ---------------------------------------------------------------------------------------------
# Personal information

# Explicit ASCII classes: `\w` and `\d` would take in Chinese characters and full-width digits.
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
                    r"\.[A-Za-z]{2,}(?![A-Za-z0-9])")
# Mobile: 1[3-9]X XXXX XXXX, optionally +86/0086/86 and spaces or dashes between the 3-4-4
# groups. The look-arounds keep digits inside longer runs (IDs, serial numbers) untouched.
_MOBILE = re.compile(r"(?<![0-9+])(?:(?:\+|00)?86[ -]?)?1[3-9][0-9](?:[ -]?[0-9]{4}){2}(?![0-9])")
# Landline: area code 0XX or 0XXX, a dash, 7-8 digits (010-12345678, 0755-1234567).
_LANDLINE = re.compile(r"(?<![0-9-])0[0-9]{2,3}-[0-9]{7,8}(?![0-9])")


# Every phone number above contains 3 digits, maybe a space or dash, then 4 digits. Starting
# with a plain character class lets `re` scan for it quickly (~350 MB/s, 10x the full patterns,
# whose optional prefixes and look-behinds defeat that scan); prose rarely has such runs.
_PHONE_HINT = re.compile("[0-9][0-9][0-9][ -]?[0-9][0-9][0-9][0-9]")


def mask_pii(text: str) -> tuple[str, int]:
    """Replace e-mail addresses with `<email>` and Chinese mobile and landline numbers with
    `<phone>`; returns (text, number of replacements)."""
    count = 0
    if "@" in text:
        text, n = _EMAIL.subn("<email>", text)
        count += n
    if _PHONE_HINT.search(text) is not None:
        text, n = _MOBILE.subn("<phone>", text)
        count += n
        if "-" in text:
            text, n = _LANDLINE.subn("<phone>", text)
            count += n
    return text, count


# ---------------------------------------------------------------------------------------------
# Measures

# Punctuation that ordinary Chinese and English text uses. Everything else that is neither a
# letter nor a digit of some script (■★◆|~^, box drawing, emoji, U+FFFD, private use) is junk.
_COMMON_PUNCT = ("，。！？；：、（）《》〈〉“”‘’「」『』【】〔〕…—–－·・～％＋＝／°℃¥￥$€£"
                 ".,!?;:'\"()[]{}<>-_/%&+=@#*")
# Mojibake made of real Han characters: 锟斤拷 (U+FFFD's UTF-8 bytes read as GBK), 烫烫/屯屯
# (uninitialized MSVC memory), and lead characters of UTF-8 punctuation read as GBK
# (“ -> 鈥, 。 -> 銆, ， -> 锛), which almost never occur in real text.
_MOJIBAKE = re.compile("锟斤拷|烫烫烫|屯屯屯|[鈥銆锛]")
_MOJIBAKE_CHARS = "锟烫屯鈥銆锛"


@functools.cache
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """Per UTF-16 code unit: is it a Han character, is it junk. Counting with these lookup
    tables over `text.encode("utf-16-le")` runs at ~300 MB/s, 3-4x a regex over the str.

    A character beyond the BMP is two units, a high surrogate (which plane) and a low one: the
    high surrogate stands for the character and the low one counts as nothing. Planes 2-3 hold
    only CJK ideographs (extensions B-H); other astral characters (emoji, private use, the
    rare historic scripts of plane 1) count as junk."""
    han = np.zeros(0x10000, dtype=np.bool_)
    for lo, hi in ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xD840, 0xD8BF)):
        han[lo:hi + 1] = True
    punct = set(_COMMON_PUNCT)
    junk = np.array([not (c.isalnum() or c.isspace() or c in punct)
                     for c in map(chr, range(0x10000))], dtype=np.bool_)
    junk[0xD800:0xE000] = True                 # astral: junk unless...
    junk[0xD840:0xD8C0] = False                # ...a CJK ideograph (planes 2-3),
    junk[0xDC00:0xE000] = False                # and low surrogates never count
    return han, junk


def _units(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-16-le", "surrogatepass"), dtype=np.uint16)


def _non_space_chars(text: str) -> int:
    return sum(map(len, text.split()))


def chinese_ratio(text: str) -> float:
    """Han characters / non-whitespace characters (0.0 for a blank text)."""
    total = _non_space_chars(text)
    return _han_count(_units(text)) / total if total else 0.0


def _han_count(units: np.ndarray) -> int:
    return int(np.count_nonzero(_tables()[0][units]))


def repeated_line_ratio(text: str) -> float:
    """Share of characters in lines that repeat an earlier line exactly (Gopher's measure);
    blank lines are ignored."""
    if "\n" not in text:
        return 0.0
    seen: set[str] = set()
    total = repeated = 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        total += len(line)
        if line in seen:
            repeated += len(line)
        else:
            seen.add(line)
    return repeated / total if total else 0.0


def junk_ratio(text: str) -> float:
    """Share of non-whitespace characters that are symbols, emoji, U+FFFD or mojibake rather
    than letters, digits (of any script) or common punctuation."""
    total = _non_space_chars(text)
    return min(_junk_count(text, _units(text)) / total, 1.0) if total else 0.0


def _junk_count(text: str, units: np.ndarray) -> int:
    junk = int(np.count_nonzero(_tables()[1][units]))
    if any(c in text for c in _MOJIBAKE_CHARS):
        junk += sum(m.end() - m.start() for m in _MOJIBAKE.finditer(text))
    return junk


# ---------------------------------------------------------------------------------------------
# Filters

FILTERS = ("too_short", "too_long", "low_chinese", "repeated_lines", "junk")


@dataclass
class FilterConfig:
    """Thresholds of the document filters. A ratio of 0 (minimum) or 1 (maximum) disables its
    filter; lengths are in characters."""

    min_chars: int = 20
    max_chars: int = 200_000
    min_chinese_ratio: float = 0.3
    max_repeated_line_ratio: float = 0.3
    max_junk_ratio: float = 0.25

    def check(self) -> FilterConfig:
        """Raise UserError naming the first bad field; returns self for chaining."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"filter config: {f.name} must be a number, got {value!r}")
            if f.name.endswith("_ratio") and not 0.0 <= value <= 1.0:
                raise UserError(f"filter config: {f.name} must be between 0 and 1, got {value}")
            if f.name.endswith("_chars") and (value < 0 or not float(value).is_integer()):
                raise UserError(f"filter config: {f.name} must be a whole number >= 0, "
                                f"got {value}")
        if self.max_chars < self.min_chars:
            raise UserError(f"filter config: max_chars ({self.max_chars}) is smaller than "
                            f"min_chars ({self.min_chars})")
        return self


def filter_reason(text: str, cfg: FilterConfig) -> str | None:
    """Name of the first filter (in `FILTERS` order) that `text` fails, or None to keep it."""
    n = len(text)
    if n < cfg.min_chars:
        return "too_short"
    if n > cfg.max_chars:
        return "too_long"
    # The measures' work shared: the non-space count and the UTF-16 units, computed once.
    total = _non_space_chars(text) or 1
    units = _units(text)
    if cfg.min_chinese_ratio > 0 and _han_count(units) / total < cfg.min_chinese_ratio:
        return "low_chinese"
    if cfg.max_repeated_line_ratio < 1 and repeated_line_ratio(text) > cfg.max_repeated_line_ratio:
        return "repeated_lines"
    if cfg.max_junk_ratio < 1 and _junk_count(text, units) / total > cfg.max_junk_ratio:
        return "junk"
    return None
