"""Wikipedia dumps and wikitext -> plain text.

- `iter_wiki_pages(path)` streams the articles of a MediaWiki XML dump (`pages-articles.xml` or
  `.xml.bz2`) as `WikiPage(title, text, timestamp)`, namespace 0 only, redirects skipped, memory
  flat; `iter_wiki_dump(path)` the same as (title, wikitext) pairs.
- `wikitext_to_text(wikitext, title=, today=)` renders one article's visible prose with
  mwparserfromhell. `title` and `today` (the date its revision was saved, `WikiPage.today`) are
  what MediaWiki would know when it showed the page: {{PAGENAME}}, {{CURRENTYEAR}} and the ages
  that count up to the day of viewing ({{age|1990|1|2}}) are rendered from them, and dropped
  when they are not given.

Why not gensim's `wikicorpus`: it deletes every `{{...}}` template with a regex. On zhwiki the
birth and death dates of every biography live in templates
(`{{bd|1881年|9月25日|1936年|10月19日}}`, `{{birth date|1900|1|2}}`), and so do the local names of
foreign-language links (`{{le|中文|English}}`) and foreign terms (`{{lang|en|...}}`), so
sentences came out as "鲁迅（），浙江人". Its regexes also leave `<ref>` bodies and table cells
behind. Extractors that keep a list of templates lose the rest: WikiExtractor drops
`{{formatnum:1234567}}`, a parser function, and populations come out as "人口约为人". Here the
parse tree is walked instead: a template whose output is visible text is rendered from a table
(dates, ages, numbers and units, foreign names, flags with a country name, lists, formatting
wrappers, and the parser functions `formatnum:`, `lc:`, `uc:`, `padleft:`, `#tag:` ...), with
`1=` read as the first argument the way MediaWiki reads it; every other template (infoboxes,
navboxes, footnotes, maintenance tags, `#if:`-style logic) is dropped, as are refs, tables,
galleries, files, categories, interlanguage links and the reference / external-link sections
at the end of articles.

Speed: parsing dominates (mwparserfromhell tokenizes in C but builds its tree in Python). Refs
and comments, a large share of real articles and dropped anyway, are cut with a regex before
parsing: on a citation-heavy article that takes one core from ~1 to ~4 MB of wikitext per
second (template-dense text without refs stays near 0.5 MB/s).

zhwiki's language conversion markup (`-{zh-hans:计算机; zh-hant:電腦;}-`) is not wikitext proper
and mwparserfromhell leaves it as text, so it is resolved with a regex before parsing: the
zh-hans variant is kept (then zh-cn, zh-sg, zh-my, zh, else the first one). Rules that only
change the rest of the page (`-{H|...}-`, `-{T|...}-`, `-{-|...}-`) display nothing and are
removed; `-{A|...}-` adds a rule *and* displays its text (MediaWiki's documented meaning), so
its zh-hans variant is kept. Full traditional -> simplified conversion is `to_simplified`'s job.
"""

from __future__ import annotations

import bz2
import gzip
import re
import xml.etree.ElementTree as ET
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from babyllama.data.clean_text import clean_whitespace
from babyllama.errors import UserError, where

# ---------------------------------------------------------------------------------------------
# XML dumps


def _local(tag: str) -> str:
    """Tag name without its XML namespace ({http://www.mediawiki.org/xml/export-0.11/}page)."""
    return tag.rpartition("}")[2]


def _child(elem: ET.Element, name: str) -> ET.Element | None:
    for child in elem:
        if _local(child.tag) == name:
            return child
    return None


_REDIRECT_TEXT = re.compile(r"\s*#\s*(?:redirect|重定向)", re.IGNORECASE)


class WikiPage(NamedTuple):
    """An article of a dump: its title, its wikitext and when that revision was saved."""

    title: str
    text: str
    timestamp: datetime | None  # <revision><timestamp>, UTC; None when the export has none

    @property
    def today(self) -> date | None:
        """The day the revision was saved: "today" for a reader who saw it as the current
        version, so the ages and dates MediaWiki computes on viewing are computed as of then."""
        return self.timestamp.date() if self.timestamp is not None else None


def _timestamp(revision: ET.Element | None) -> datetime | None:
    """<timestamp>2020-05-01T12:00:00Z</timestamp> (the export format's only form) as UTC."""
    stamp = _child(revision, "timestamp") if revision is not None else None
    if stamp is None or not stamp.text:
        return None
    try:
        return datetime.strptime(stamp.text.strip(), "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=timezone.utc)
    except ValueError:
        return None


def _article(page: ET.Element) -> WikiPage | None:
    """The article of a <page> element, or None for redirects and other namespaces."""
    ns = _child(page, "ns")
    if ns is not None and (ns.text or "").strip() != "0":
        return None
    if _child(page, "redirect") is not None:
        return None
    title = _child(page, "title")
    revision = _child(page, "revision")
    text = _child(revision, "text") if revision is not None else None
    if title is None or text is None or not text.text or _REDIRECT_TEXT.match(text.text):
        return None
    return WikiPage((title.text or "").strip(), text.text, _timestamp(revision))


def iter_wiki_dump(path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of every article of a MediaWiki XML dump: `iter_wiki_pages` without
    the revision timestamps."""
    for page in iter_wiki_pages(path):
        yield page.title, page.text


def iter_wiki_pages(path) -> Iterator[WikiPage]:
    """Every article (namespace 0, not a redirect) of a MediaWiki XML dump, plain or compressed
    (.bz2, .gz). A file that is not such a dump raises UserError."""
    path = Path(path)
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix.lower(), open)
    try:
        with opener(path, "rb") as f:
            events = ET.iterparse(f, events=("start", "end"))
            _, root = next(events)
            if _local(root.tag) != "mediawiki":
                raise UserError(f"{path}: not a MediaWiki XML dump (root element is "
                                f"<{_local(root.tag)}>, expected <mediawiki>)")
            for event, elem in events:
                if event == "end" and _local(elem.tag) == "page":
                    article = _article(elem)
                    # Dropping every finished page from the root keeps memory flat on a
                    # 20 GB dump: iterparse alone would build the whole tree.
                    root.clear()
                    if article is not None:
                        yield article
    except ET.ParseError as e:
        line = e.position[0] if getattr(e, "position", None) else None
        raise UserError(f"{where(path, line)}: not a valid MediaWiki XML dump ({e})") from None
    except StopIteration:
        raise UserError(f"{path}: empty file, not a MediaWiki XML dump") from None
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, EOFError) as e:  # a bad .bz2/.gz stream, a truncated download
        raise UserError(f"{path}: cannot read ({e})") from None


# ---------------------------------------------------------------------------------------------
# Language conversion markup -{...}-

_CONVERSION = re.compile(r"-\{(?!\{)(.*?)\}-", re.DOTALL)
# Flags before `|`: single letters (A, H, T, R, D, -) or variant names (zh;zh-hans;zh-hant).
_FLAGS = re.compile(r"\s*(?:[A-Za-z+-]|zh(?:-[a-z]+)*)(?:\s*;\s*(?:[A-Za-z+-]|zh(?:-[a-z]+)*))*"
                    r"\s*;?\s*")
_VARIANT = re.compile(r"(?:^|;)\s*(zh(?:-[a-z]+)*)\s*:", re.IGNORECASE)
_PREFERRED = ("zh-hans", "zh-cn", "zh-sg", "zh-my", "zh")


def _pick_variant(body: str) -> str:
    marks = list(_VARIANT.finditer(body))
    if not marks:
        return body  # -{text}-: text protected from conversion, shown as is
    variants = {}
    for mark, following in zip(marks, marks[1:] + [None]):
        end = following.start() if following is not None else len(body)
        value = body[mark.end():end].strip().rstrip(";").strip()
        variants.setdefault(mark.group(1).lower(), value)
    for name in _PREFERRED:
        if name in variants:
            return variants[name]
    return next(iter(variants.values()))


def _resolve_conversion(match: re.Match) -> str:
    body = match.group(1)
    flags, bar, rest = body.partition("|")
    if bar and _FLAGS.fullmatch(flags):
        names = {f.strip() for f in flags.split(";")}
        if names & {"H", "T", "-", "D"}:
            return ""  # page-wide rules and title changes: nothing displayed here
        if "R" in names:
            return rest  # raw: shown exactly as written
        body = rest
    return _pick_variant(body)


def resolve_conversion(wikitext: str) -> str:
    """Replace zhwiki's `-{...}-` language conversion markup with the text it displays in
    simplified Chinese."""
    return _CONVERSION.sub(_resolve_conversion, wikitext) if "-{" in wikitext else wikitext


# ---------------------------------------------------------------------------------------------
# Templates that render text
#
# A dump holds template *calls*; MediaWiki expands them only when it shows the page. Most
# templates in articles are not prose (infoboxes, navboxes, footnotes, maintenance tags such as
# {{citation needed}}) and are dropped, but some put visible text into the sentence around them:
# a date, a number, a foreign name, a country. Dropping those leaves "人口约为人", so every
# template whose output is visible text is rendered from a table below (name -> rule), as close
# to what the reader of the page sees as plain text allows.


@dataclass(frozen=True)
class _Page:
    """What MediaWiki knows about the page it shows besides its text: the title, and the day it
    is shown (here the day the revision was saved). None when the caller does not know it."""

    title: str | None = None
    today: date | None = None


_PAGE: ContextVar[_Page] = ContextVar("wikitext_page", default=_Page())  # noqa: B039 (frozen: never mutated)


class _Args:
    """A template call's arguments, numbered the way MediaWiki numbers them.

    Unnamed arguments fill the slots 1, 2, 3, ... in order, and `n=` names the same slot:
    `{{x|1=a}}` is `{{x|a}}` (the usual way to pass text that contains "="), and when both fill
    one slot the one written last wins. MediaWiki trims named values and not unnamed ones; here
    both are trimmed, since the text is spliced into a sentence.
    """

    _SLOT = re.compile(r"[1-9][0-9]{0,2}")  # "1".."999" name a slot; "01" is just a name

    def __init__(self, template):
        self.page = _PAGE.get()  # the page the call is on: {{age|1990|1|2}} needs its date
        self.named: dict[str, str] = {}
        slots: dict[int, str] = {}
        unnamed = 0
        for param in template.params:
            value = _render(param.value).strip()
            if not param.showkey:
                unnamed += 1
                slots[unnamed] = value
                continue
            key = str(param.name).strip()
            if self._SLOT.fullmatch(key):
                slots[int(key)] = value
            else:
                self.named[key] = value
        self.positional = [slots.get(i, "") for i in range(1, max(slots, default=0) + 1)]

    def __getitem__(self, key: int | str) -> str:
        """Argument at a 1-based position, or by name; "" when not given."""
        if isinstance(key, int):
            return self.positional[key - 1] if 0 < key <= len(self.positional) else ""
        return self.named.get(key, "")


Rule = Callable[[_Args], str]

# Rules most templates need, so the table below stays one line per template.


def _first(*keys: int | str) -> Rule:
    """The first non-empty of these arguments: `_first("text", 1)` reads `text=`, else the 1st."""
    return lambda a: next((a[k] for k in keys if a[k]), "")


def _joined(separator: str) -> Rule:
    """Every non-empty positional argument, joined: {{hlist|a|b}}, {{ubl|a|b}}."""
    return lambda a: separator.join(x for x in a.positional if x)


def _text(text: str) -> Rule:
    """Always the same text: {{!}} -> |, {{CHN}} -> 中国; "" for icon-only templates."""
    return lambda a: text


# --- dates

_MONTH_NAMES = ("january", "february", "march", "april", "may", "june", "july", "august",
                "september", "october", "november", "december")


def _month(value: str) -> int | None:
    """5, 05, May, may -> 5: month arguments may be numbers or English names (or their first
    three letters), as Module:Date and {{as of}} accept them."""
    if value.isdigit():
        return int(value) if 1 <= int(value) <= 12 else None
    name = value.strip(".").lower()
    for number, month in enumerate(_MONTH_NAMES, 1):
        if len(name) >= 3 and month.startswith(name):
            return number
    return None


_ISO_DATE = re.compile(r"(\d{1,4})(?:-(\d{1,2})(?:-(\d{1,2}))?)?")
_CJK_DATE = re.compile(r"(\d{1,4})年(?:(\d{1,2})月(?:(\d{1,2})日)?)?")
_DMY_DATE = re.compile(r"(?:(\d{1,2})\s+)?([A-Za-z]+\.?)\s+(\d{1,4})")      # (2) January 2020
_MDY_DATE = re.compile(r"([A-Za-z]+\.?)\s+(\d{1,2}),?\s+(\d{1,4})")          # January 2, 2020


def _parse_date(text: str) -> tuple[int, ...] | None:
    """(year,), (year, month) or (year, month, day) of a date written in one argument: 2020-01-02,
    2020年1月2日, 2 January 2020, January 2, 2020, January 2020; None for anything else."""
    text = text.strip()
    if match := _ISO_DATE.fullmatch(text) or _CJK_DATE.fullmatch(text):
        parts = tuple(int(x) for x in match.groups() if x)
    elif match := _MDY_DATE.fullmatch(text):
        month = _month(match[1])
        parts = (int(match[3]), month, int(match[2])) if month else None
    elif match := _DMY_DATE.fullmatch(text):
        month = _month(match[2])
        parts = ((int(match[3]), month) + ((int(match[1]),) if match[1] else ())) if month else None
    else:
        return None
    if parts is None or (len(parts) > 1 and not 1 <= parts[1] <= 12):
        return None
    if len(parts) == 3:
        try:
            date(*parts)
        except ValueError:  # 2 月 30 日
            return None
    return parts


def _cjk_date(parts: tuple[int, ...]) -> str:
    """(2020, 1, 2) -> 2020年1月2日, (2020, 1) -> 2020年1月, (2020,) -> 2020年."""
    return "".join(f"{value}{unit}" for value, unit in zip(parts, "年月日"))


def _dates(values: list[str]) -> list[date] | None:
    """The full dates in a template's arguments, each written as year|month|day or in one
    argument (`_parse_date`); None when one of them is not a full, valid date."""
    dates, i = [], 0
    while i < len(values):
        if i + 2 < len(values) and values[i].isdigit() and values[i + 2].isdigit():
            parts, i = (int(values[i]), _month(values[i + 1]), int(values[i + 2])), i + 3
        else:
            parts, i = _parse_date(values[i]), i + 1
        try:
            dates.append(date(*parts))
        except (TypeError, ValueError):  # no such date, or a month or day missing (None)
            return None
    return dates


def _years(born: date, on: date) -> str:
    """Whole years from one date to another ("" when the second comes first)."""
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    return str(years) if years >= 0 else ""


def _birth_death(a: _Args) -> str:
    """{{bd|1881年|9月25日|1936年|10月19日}} -> 1881年9月25日—1936年10月19日 (— alone when living)."""
    birth, death = a[1] + a[2], a[3] + a[4]
    return f"{birth}—{death}" if birth or death else ""


def _ymd(a: _Args) -> str:
    """{{birth date|1900|1|2}} -> 1900年1月2日 (the month may be a name: 1900|January|2); the
    first date of the *and age* variants."""
    values = [x for x in a.positional if x]
    if not values:
        return ""
    if not values[0].isdigit():
        return values[0]  # {{birth date|1900年1月2日}}: already text
    parts = [int(values[0])]
    month = _month(values[1]) if len(values) > 1 else None
    if month is not None:
        parts.append(month)
        if len(values) > 2 and values[2].isdigit():
            parts.append(int(values[2]))
    return _cjk_date(tuple(parts))


def _age(a: _Args) -> str:
    """{{age|1949|10|1|2019|10|1}} -> 70: whole years between two dates (also written one
    argument each: {{age|1949-10-1|2019-10-1}}).

    With one date MediaWiki counts up to the day the page is viewed. The dump records when each
    revision was saved, so the age is the one its readers saw then (`today`, the revision's
    date), the same on every run. Without that date (markup given directly) nothing is shown:
    a birth date where the sentence expects a number ("享年1949年10月1日岁") reads worse than a gap.
    """
    dates = _dates([x for x in a.positional if x])
    if dates and len(dates) == 1 and a.page.today is not None:
        dates.append(a.page.today)
    return _years(*dates) if dates and len(dates) == 2 else ""


def _date_and_age(a: _Args) -> str:
    """{{birth date and age|1990|12|5}} -> 1990年12月5日（29岁）: the date, and the age on the
    revision's date as zhwiki's template shows it; the date alone when that is unknown."""
    shown = _ymd(a)
    dates = _dates([x for x in a.positional if x][:3])
    age = _years(dates[0], a.page.today) if dates and a.page.today is not None else ""
    return f"{shown}（{age}岁）" if age else shown


def _date(a: _Args) -> str:
    """{{date|2020-01-02}} -> 2020年1月2日: a date in the Chinese order whatever format the 2nd
    argument asks for (dmy, mdy, ymd: orders of English month names), as written when it is not
    a date; {{date}} alone is the day the page is shown."""
    today = a.page.today
    if not a[1]:
        return _cjk_date((today.year, today.month, today.day)) if today is not None else ""
    parts = _parse_date(a[1])
    return _cjk_date(parts) if parts else a[1]


def _as_of(a: _Args) -> str:
    """{{as of|2020|5}} -> 截至2020年5月, as zhwiki's {{As of}} shows it (enwiki: "As of May
    2020"); `alt=` replaces the whole text."""
    return a["alt"] or (f"截至{_ymd(a)}" if a[1] else "")


# The date only. {{death date and age}} also shows the age at death, {{birth year and age}} an
# age range and {{start date and age}} the years since; here they show the date alone.
_DATE_TEMPLATES = ("birth date", "death date", "death date and age",
                   "birth year and age", "death year and age", "start date", "end date",
                   "start date and age", "dob", "dda", "出生日期", "逝世日期", "逝世日期和年龄",
                   "逝世日期和年齡", "死亡日期", "死亡日期和年龄", "死亡日期和年齡")
# The date and the age on the day the page is shown.
_DATE_AND_AGE_TEMPLATES = ("birth date and age", "bda", "出生日期和年龄", "出生日期和年齡")

# --- names in other languages


def _tsl(a: _Args) -> str:
    """{{tsl|en|Foreign title|本地标题|显示文字}}: the displayed (else local) title."""
    return a[4] or a[3] or a[2]


# {{zh|s=中国|t=中國|p=Zhōngguó}}: each form with its label, in enwiki's {{zh}} order.
_ZH_LABELS = (("c", "中文"), ("s", "简体字"), ("t", "繁体字"), ("p", "汉语拼音"),
              ("tp", "通用拼音"), ("w", "威妥玛拼音"), ("j", "粤拼"), ("y", "耶鲁粤拼"),
              ("poj", "白话字"), ("zhu", "注音符号"), ("l", "字面意思"))


def _zh(a: _Args) -> str:
    """{{zh|s=中国|t=中國}} -> 简体字：中国；繁体字：中國."""
    return "；".join(f"{label}：{a[key]}" for key, label in _ZH_LABELS if a[key])


def _nihongo(a: _Args) -> str:
    """{{nihongo|东京|東京|Tōkyō}} -> 东京（東京，Tōkyō）: the name, then the Japanese and its
    romanization in brackets, as {{nihongo}} shows them (full-width brackets in Chinese)."""
    inside = "，".join(x for x in (a[2], a[3], a[4]) if x)
    return f"{a[1]}（{inside}）" if inside else a[1]


# --- numbers and units

_NUMBER = re.compile(r"([-+\u2212]?)([0-9]+)(\.[0-9]+)?")
_THOUSANDS = re.compile(r"(?<=[0-9])(?=(?:[0-9]{3})+$)")


def _group_digits(number: str) -> str:
    """1234567.25 -> 1,234,567.25: commas every three digits of the integer part, as
    MediaWiki's formatnum shows numbers in Chinese (and English); anything else unchanged."""
    match = _NUMBER.fullmatch(number)
    if not match:
        return number
    sign, integer, fraction = match.groups()
    return sign + _THOUSANDS.sub(",", integer) + (fraction or "")


def _convert_units(a: _Args) -> str:
    """{{convert|10|km|mi}} -> 10km; {{convert|1|-|2|km}} -> 1–2km (no conversion shown)."""
    if a[2] in ("-", "–", "to", "and", "~", "至", "到"):
        return f"{a[1]}–{a[3]}{a[4]}"
    return a[1] + a[2]


def _val(a: _Args) -> str:
    """{{val|1.5|e=6|u=m}} -> 1.5×10^6 m; {{val|9.8|0.2}} -> 9.8±0.2; {{val|5|+2|-1}} -> 5+2-1.

    Module:Val sets the exponent as a superscript; "^" keeps it readable as plain text.
    """
    number = a["p"] + a[1]
    if a[2]:
        number += a[2] + a[3] if a[3] else f"±{a[2]}"
    if a["e"]:
        number += f"×10^{a['e']}"
    unit = a["u"] or a["ul"]
    per = a["up"] or a["upl"]
    if per:
        unit += f"/{per}"
    if unit:
        # A space before the unit, except for the symbols written against the number.
        number += unit if unit[0] in "°%′″'\"" else f" {unit}"
    return number + a["s"]


# --- quotations, addresses, fractions, template names


def _quotation(*attribution: tuple[int | str, ...]) -> Rule:
    """{{quote|引文|作者|出处}}: the quotation as a paragraph of its own, then the attribution
    line that {{blockquote}} prints under it (——作者，出处). `attribution`: the arguments that
    hold its parts (author, title, source) in a given template."""

    def quotation(a: _Args) -> str:
        text = _first("text", "quote", 1)(a)
        sign = "，".join(x for x in (_first(*keys)(a) for keys in attribution) if x)
        return (f"\n{text}\n" + (f"——{sign}\n" if sign else "")) if text else ""

    return quotation


_URL_SCHEME = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)


def _url(a: _Args) -> str:
    """{{URL|https://www.example.com/}} -> www.example.com, {{URL|example.com|示例}} -> 示例: the
    display text, else the address as Module:URL shows it (no scheme, no lone trailing /)."""
    if a[2]:
        return a[2]
    shown = _URL_SCHEME.sub("", a[1])
    return shown[:-1] if shown.endswith("/") and shown.count("/") == 1 else shown


def _frac(a: _Args) -> str:
    """{{frac|1|2}} -> 1/2, {{frac|3|1|2}} -> 3 1/2 (a whole number and a fraction), {{frac|4}}
    -> 1/4; the fraction slash is written as "/"."""
    p = a.positional
    if len(p) >= 3:
        return f"{p[0]} {p[1]}/{p[2]}"
    return f"{p[0]}/{p[1]}" if len(p) == 2 else f"1/{p[0]}" if p else ""


def _tl(a: _Args) -> str:
    """{{tl|cite web}} -> {{cite web}}: a template's name in braces, as the pages that document
    templates print it."""
    return "{{" + a[1] + "}}" if a[1] else ""


def _tlx(a: _Args) -> str:
    """{{tlx|cite web|url{{=}}x}} -> {{cite web|url=x}}: the name and its example arguments."""
    return "{{" + "|".join(a.positional) + "}}" if a[1] else ""


# --- flags: the country name where the template shows one, nothing for a bare icon

# zhwiki's {{CHN}}-style templates (IOC codes) show a flag and the country's short name.
_COUNTRIES = dict(pair.split(":") for pair in """
    CHN:中国 TPE:中华台北 HKG:香港 MAC:澳门 ROC:中华民国 JPN:日本 KOR:韩国 PRK:朝鲜 MGL:蒙古
    USA:美国 CAN:加拿大 MEX:墨西哥 CUB:古巴 JAM:牙买加 BRA:巴西 ARG:阿根廷 CHI:智利 COL:哥伦比亚
    PER:秘鲁 URU:乌拉圭 PAR:巴拉圭 VEN:委内瑞拉 ECU:厄瓜多尔 GBR:英国 ENG:英格兰 SCO:苏格兰
    WAL:威尔士 NIR:北爱尔兰 IRL:爱尔兰 FRA:法国 GER:德国 ITA:意大利 ESP:西班牙 POR:葡萄牙
    NED:荷兰 BEL:比利时 SUI:瑞士 AUT:奥地利 SWE:瑞典 NOR:挪威 DEN:丹麦 FIN:芬兰 ISL:冰岛
    POL:波兰 CZE:捷克 SVK:斯洛伐克 HUN:匈牙利 ROU:罗马尼亚 BUL:保加利亚 GRE:希腊 TUR:土耳其
    RUS:俄罗斯 UKR:乌克兰 BLR:白俄罗斯 CRO:克罗地亚 SRB:塞尔维亚 SLO:斯洛文尼亚 AUS:澳大利亚
    NZL:新西兰 IND:印度 PAK:巴基斯坦 THA:泰国 VIE:越南 MAS:马来西亚 SGP:新加坡 INA:印度尼西亚
    PHI:菲律宾 KAZ:哈萨克斯坦 UZB:乌兹别克斯坦 IRI:伊朗 IRQ:伊拉克 KSA:沙特阿拉伯 QAT:卡塔尔
    UAE:阿拉伯联合酋长国 ISR:以色列 EGY:埃及 RSA:南非 NGR:尼日利亚 KEN:肯尼亚 ETH:埃塞俄比亚
    MAR:摩洛哥 ALG:阿尔及利亚 TUN:突尼斯 CMR:喀麦隆 GHA:加纳 CIV:科特迪瓦 SEN:塞内加尔
    """.split())


def _country(a: _Args) -> str:
    """{{flag|中国}} -> 中国, {{flagcountry|CHN}} -> 中国: the name shown next to the flag
    (`name=` when given, a known code spelled out)."""
    return a["name"] or _COUNTRIES.get(a[1].upper(), a[1])


# Names are matched after folding case and "_" (see `_template_name`). zhwiki also finds a
# template under its other script ({{黑體}} calls Template:黑体: MediaWiki's findVariantLink),
# so both spellings of a Chinese name are listed.
_TEMPLATES: dict[str, Rule] = {
    # Dates: zhwiki biographies keep their birth and death dates in templates.
    "bd": _birth_death,
    **dict.fromkeys(_DATE_TEMPLATES, _ymd),
    **dict.fromkeys(_DATE_AND_AGE_TEMPLATES, _date_and_age),
    **dict.fromkeys(("age", "age in years", "年龄", "年齡"), _age),
    "date": _date, "as of": _as_of,
    # Foreign names and links to other wikis: the text shown in the sentence.
    "lang": _first(2, "text"), "langx": _first(2, "text"), "script": _first(2),
    "transl": _first(3, 2),  # {{transl|zh|Zhōngguó}}; a 3rd argument follows a scheme name
    "lang-zh": lambda a: _first(1, "text")(a) or _zh(a),  # enwiki's takes {{zh}}'s c=, s=, p=
    "le": _first(1), "ill": _first(1), "ilh": _first(1), "interlanguage link": _first(1),
    "interlanguage link multi": _first(1), "tsl": _tsl, "translink": _tsl,
    "zh": _zh, "nihongo": _nihongo, "nihongo2": _first(1),
    # Formatting wrappers show one argument and style it: <span class="nowrap">{{{1}}}</span>.
    # The text is the 1st argument, except {{color|red|文字}} (2nd), {{font color|fg|文字}} and
    # {{font color|fg|bg|文字}} (3rd if given, else 2nd) and {{resize|90%|文字}} (2nd if given).
    **dict.fromkeys(("nowrap", "nobr", "small", "big", "larger", "smaller", "em", "bold",
                     "strong", "underline", "strikethrough", "strike", "smallcaps", "sup", "sub",
                     "math", "mvar", "var", "code", "kbd", "小", "黑体", "黑體"), _first(1)),
    "color": _first(2), "colour": _first(2), "font color": _first(3, 2),
    "fontcolor": _first(3, 2), "resize": _first(2, 1), "allcaps": lambda a: a[1].upper(),
    "font": _first("text", 1), "abbr": _first(1), "ruby": _first(1),
    # Quotations: enwiki's {{blockquote}} (= {{quote}}) is text|author|title|source, {{cquote}}
    # quote|(width)|(colour)|author|source; all take author= and source= by name.
    **dict.fromkeys(("quote", "blockquote"), _quotation(("author", "sign", "cite", 2),
                                                        ("title", 3), ("source", 4))),
    "cquote": _quotation(("author", 4), ("title",), ("source", 5)),
    # Addresses and names shown as text: {{tl|name}} prints "{{name}}".
    "url": _url, "isbn": lambda a: f"ISBN {a[1]}" if a[1] else "",
    "tl": _tl, "template link": _tl, "tlx": _tlx,
    # Numbers and units ({{ordinal|3}}: the number; Chinese writes 第…名 around it).
    "convert": _convert_units, "cvt": _convert_units, "val": _val, "ordinal": _first(1),
    "frac": _frac, "fraction": _frac,
    # Lists: {{hlist}} is separated by " · " (its stylesheet), {{ubl}} is one item per line,
    # {{plainlist}} / {{flatlist}} wrap an ordinary * list given as their argument.
    "hlist": _joined(" · "), "ubl": _joined("\n"), "unbulleted list": _joined("\n"),
    "plainlist": _first(1), "flatlist": _first(1),
    # Flags.
    "flag": _country, "flagcountry": _country, "flagu": _country,
    "flagicon": _text(""), "flagdeco": _text(""),
    **{code.lower(): _text(name) for code, name in _COUNTRIES.items()},
    # Characters that cannot be written inside a template call.
    "!": _text("|"), "=": _text("="), "·": _text("·"), "ndash": _text("–"),
    "mdash": _text("—"), "snd": _text(" – "), "spaced ndash": _text(" – "),
    "nbsp": _text(" "), "space": _text(" "),
}
# Families by prefix: {{lang-en|text}}, {{link-en|中文|English}}, {{internal link helper/en|...}}.
_TEMPLATE_PREFIXES = (("lang-", _first(1, "text")), ("link-", _first(1)),
                      ("internal link helper", _first(1)))
_TEMPLATE_NAMESPACE = re.compile(r"^(?:template|模板|样板|樣板)\s*:\s*", re.IGNORECASE)


def _template_name(template) -> str:
    """The name as a table key. MediaWiki ignores the whitespace around a name, reads "_" as a
    space and folds the case of its first letter; the whole name is folded here, which also
    catches the capitalized redirects ({{Birth Date}}) of the templates in the table."""
    name = " ".join(str(template.name).replace("_", " ").split()).lower()
    return _TEMPLATE_NAMESPACE.sub("", name)


# --- parser functions and magic words: {{name:first|second|...}}
#
# mwparserfromhell parses {{formatnum:1234567}} as a template named "formatnum:1234567". The
# functions below only reshape their argument, so they are rendered. Those with logic are
# dropped with the templates not in the table:
# - {{#if:}}, {{#ifeq:}}, {{#switch:}}, {{#invoke:}} (Lua): in articles they test things a dump
#   does not hold (other templates' output, Lua modules), and rendering a guessed branch would
#   put text in the corpus that no reader saw.
# - {{#expr:}}: in article text its operands are nearly always other templates or variables
#   ({{#expr:{{CURRENTYEAR}}-1949}}), and MediaWiki's expression language is larger than plain
#   arithmetic (mod, ^, e, pi, trunc, floor, comparisons, and/or/not, PHP's float printing:
#   1/3 -> 0.33333333333333). A small evaluator would print numbers no reader saw wherever it
#   falls short, so the call is dropped like the other logic; `eval` is never an option.
# - {{#time:}}: a format language of its own (and a date it often takes from {{CURRENTYEAR}}).
# - {{DEFAULTSORT:...}} shows nothing.


def _page_name(page: _Page) -> str:
    return page.title or ""


def _on_today(show: Callable[[date], str]) -> Callable[[_Page], str]:
    """A date variable, shown as of the page's `today` ("" when that is unknown)."""
    return lambda page: show(page.today) if page.today is not None else ""


_GENITIVE_MONTHS = "一月 二月 三月 四月 五月 六月 七月 八月 九月 十月 十一月 十二月".split()

# Variables: {{PAGENAME}}, {{CURRENTYEAR}} (case-sensitive: {{pagename}} is a template call).
# - The page name family is the title: an article is in the main namespace, which has no
#   subpages on Wikipedia, so FULL-, BASE-, ROOT- and SUBPAGENAME are all the title too.
# - CURRENT* are the date the revision was saved (UTC, as MediaWiki's CURRENT* are), written as
#   zh-hans MediaWiki writes them (MessagesZh_hans: 5月, 五月, 星期五). The LOCAL* ones depend on
#   the wiki's time zone, which a dump does not record, and the time of day (CURRENTTIME,
#   CURRENTHOUR, CURRENTTIMESTAMP) needs more than the date `today` is: both are dropped.
_VARIABLES: dict[str, Callable[[_Page], str]] = {
    **dict.fromkeys(("PAGENAME", "FULLPAGENAME", "BASEPAGENAME", "ROOTPAGENAME", "SUBPAGENAME",
                     "SUBJECTPAGENAME", "ARTICLEPAGENAME"), _page_name),
    "CURRENTYEAR": _on_today(lambda d: str(d.year)),
    "CURRENTMONTH": _on_today(lambda d: f"{d.month:02d}"),
    "CURRENTMONTH2": _on_today(lambda d: f"{d.month:02d}"),
    "CURRENTMONTH1": _on_today(lambda d: str(d.month)),
    "CURRENTMONTHNAME": _on_today(lambda d: f"{d.month}月"),
    "CURRENTMONTHABBREV": _on_today(lambda d: f"{d.month}月"),
    "CURRENTMONTHNAMEGEN": _on_today(lambda d: _GENITIVE_MONTHS[d.month - 1]),
    "CURRENTDAY": _on_today(lambda d: str(d.day)),
    "CURRENTDAY2": _on_today(lambda d: f"{d.day:02d}"),
    "CURRENTDOW": _on_today(lambda d: str(d.isoweekday() % 7)),  # 0 is Sunday
    "CURRENTDAYNAME": _on_today(lambda d: "星期" + "一二三四五六日"[d.weekday()]),
    "CURRENTWEEK": _on_today(lambda d: str(d.isocalendar()[1])),
}


def _formatnum(args: list[str]) -> str:
    """{{formatnum:1234567}} -> 1,234,567; -12 and 2345.6 -> -12 and 2,345.6.

    Digits are grouped with commas as zhwiki shows them. The ASCII "-" is kept where recent
    MediaWiki displays U+2212 (−), so that numbers read the same across the corpus. Flags:
    `R` undoes the formatting (1,234 -> 1234), `NOSEP` keeps the digits ungrouped.
    """
    number, flag = args[0], (args[1].upper() if len(args) > 1 else "")
    if flag == "R":
        return number.replace(",", "")
    return number if flag == "NOSEP" else _group_digits(number)


def _pad(left: bool) -> Callable[[list[str]], str]:
    """{{padleft:7|3}} -> 007, {{padright:ab|5|-}} -> ab---: padded to a length (MediaWiki caps
    it at 500) with a pad string, "0" by default, repeated and cut to fit."""

    def pad(args: list[str]) -> str:
        text, length = args[0], (args[1] if len(args) > 1 else "")
        filler = (args[2] if len(args) > 2 else "") or "0"
        if not length.isdigit() or len(text) >= min(int(length), 500):
            return text
        fill = (filler * 500)[:min(int(length), 500) - len(text)]
        return fill + text if left else text + fill

    return pad


def _tag_function(args: list[str]) -> str:
    """{{#tag:span|text|class=x}}: the tag <span class=x>text</span>, rendered as that tag is:
    {{#tag:ref|...}} is a footnote and dropped, the way <ref> is."""
    name = args[0].lower()
    if name in _DROPPED_TAGS:
        return ""
    if name in _BREAK_TAGS:
        return "\n"
    content = args[1] if len(args) > 1 else ""
    return f"\n{content}\n" if name in _BLOCK_TAGS else content


_PARSER_FUNCTIONS: dict[str, Callable[[list[str]], str]] = {
    "formatnum": _formatnum,
    "lc": lambda args: args[0].lower(), "uc": lambda args: args[0].upper(),
    "lcfirst": lambda args: args[0][:1].lower() + args[0][1:],
    "ucfirst": lambda args: args[0][:1].upper() + args[0][1:],
    "padleft": _pad(left=True), "padright": _pad(left=False),
    "#tag": _tag_function,
    # Without a user preference, MediaWiki shows the date as written.
    "#formatdate": lambda args: args[0], "#dateformat": lambda args: args[0],
}


def _function_args(template) -> list[str]:
    """Arguments of {{name:first|second|...}}, in order and trimmed. MediaWiki does not split
    a parser function's arguments at "=", so `class=x` stays one argument."""
    first = _render(template.name).partition(":")[2]
    rest = [(f"{_render(p.name)}=" if p.showkey else "") + _render(p.value)
            for p in template.params]
    return [arg.strip() for arg in (first, *rest)]


def _render_template(template) -> str:
    variable = _VARIABLES.get(str(template.name).strip()) if not template.params else None
    if variable is not None:
        return variable(_PAGE.get())
    # Parser functions are case-insensitive: {{FORMATNUM:1}} is {{formatnum:1}}.
    head, colon, _ = str(template.name).partition(":")
    function = _PARSER_FUNCTIONS.get(head.strip().lower()) if colon else None
    if function is not None:
        return function(_function_args(template))
    name = _template_name(template)
    rule = _TEMPLATES.get(name)
    if rule is None:
        rule = next((r for prefix, r in _TEMPLATE_PREFIXES if name.startswith(prefix)), None)
    return rule(_Args(template)) if rule is not None else ""


# ---------------------------------------------------------------------------------------------
# Links, tags and the tree walk

# Namespaces whose links are not text: files, images, media and categories (English and the
# Chinese aliases zhwiki accepts).
_HIDDEN_NAMESPACES = {"file", "image", "media", "category", "文件", "檔案", "档案", "图像", "圖像",
                      "图片", "圖片", "媒体", "媒體", "媒体文件", "媒體檔案", "分类", "分類"}
# `[[en:Lu Xun]]` at the end of an article is an interlanguage link, shown in the sidebar only.
_LANGUAGE_PREFIX = re.compile(r"[a-z]{2,3}(?:-[a-z0-9]+)*|simple")
_NOT_LANGUAGES = {"wp", "wt"}
_PIPE_TRICK = re.compile(r"\s*[（(][^（）()]*[）)]\s*$")


def _render_link(link) -> str:
    title = str(link.title).strip()
    shown_namespace = title.startswith(":")  # [[:Category:X]] is a link to the category page
    title = title.lstrip(":").strip()
    prefix, colon, _ = title.partition(":")
    prefix = prefix.strip().lower()
    if colon and not shown_namespace:
        if prefix in _HIDDEN_NAMESPACES:
            return ""
        if _LANGUAGE_PREFIX.fullmatch(prefix) and prefix not in _NOT_LANGUAGES:
            return ""
    if link.text is None:
        return _render(link.title).strip().lstrip(":")
    text = _render(link.text)
    return text if text.strip() else _PIPE_TRICK.sub("", title)  # [[a (b)|]] -> a


# Tags whose content is not prose: citations, math, galleries, code-ish extension tags, tables.
_DROPPED_TAGS = {"ref", "references", "gallery", "math", "chem", "ce", "timeline", "imagemap",
                 "score", "syntaxhighlight", "source", "graph", "mapframe", "maplink",
                 "templatestyles", "hiero", "inputbox", "categorytree", "table", "includeonly",
                 "indicator", "section", "charinsert", "noinclude", "style", "script"}
_BREAK_TAGS = {"br", "hr"}
_BLOCK_TAGS = {"p", "div", "li", "dd", "dt", "blockquote", "center", "poem", "pre", "ul", "ol",
               "dl", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "caption"}


def _render_tag(tag) -> str:
    name = str(tag.tag).strip().lower()
    if name in _DROPPED_TAGS:
        return ""
    if name in _BREAK_TAGS:
        return "\n"
    if tag.self_closing or tag.contents is None:
        return ""  # list markers (*, #, :, ;) and empty tags: the line itself stays
    inner = _render(tag.contents)
    return f"\n{inner}\n" if name in _BLOCK_TAGS else inner


# Sections at the end of articles that hold references, links and lists, not prose.
_SKIPPED_SECTIONS = {"参考文献", "參考文獻", "参考资料", "參考資料", "参考来源", "參考來源", "参考",
                     "參考", "来源", "來源", "注释", "註釋", "注解", "註解", "脚注", "腳注", "附注",
                     "附註", "外部链接", "外部連結", "外部鏈接", "外部连结", "参见", "參見", "参看",
                     "參看", "相关条目", "相關條目", "延伸阅读", "延伸閱讀", "扩展阅读", "擴展閱讀",
                     "references", "notes", "external links", "see also", "further reading",
                     "bibliography"}


_nodes = None  # mwparserfromhell.nodes, imported on first use (an optional dependency)


def _render(code) -> str:
    """Visible text of a Wikicode (a tree of nodes)."""
    n = _nodes
    out: list[str] = []
    skip_level = 0  # while > 0, inside a skipped section of this heading level
    for node in code.nodes:
        if isinstance(node, n.Heading):
            if skip_level and node.level > skip_level:
                continue
            skip_level = 0
            title = _render(node.title).strip()
            if title.lower() in _SKIPPED_SECTIONS:
                skip_level = node.level
                continue
            out.append(f"\n{title}\n")
        elif skip_level:
            continue
        elif isinstance(node, n.Text):
            out.append(node.value)
        elif isinstance(node, n.Wikilink):
            out.append(_render_link(node))
        elif isinstance(node, n.Template):
            out.append(_render_template(node))
        elif isinstance(node, n.Tag):
            out.append(_render_tag(node))
        elif isinstance(node, n.ExternalLink):
            # [url label] shows the label, [url] a footnote-like number, a bare url itself.
            if node.brackets:
                out.append(_render(node.title) if node.title is not None else "")
            else:
                out.append(str(node.url))
        elif isinstance(node, n.HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, n.Argument) and node.default is not None:
            out.append(_render(node.default))
        # Comments, parameters without default: nothing visible.
    return "".join(out)


_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
# <ref name="x"/> and <ref ...>...</ref> (refs do not nest); not <references/>.
_REF = re.compile(r"<ref(?![\w-])[^<>]*?/>|<ref(?![\w-])[^<>]*>.*?</ref\s*>",
                  re.IGNORECASE | re.DOTALL)
_MAGIC_WORD = re.compile(r"__(?:[A-Z]+|[\u4e00-\u9fff]+)__")
_QUOTES = re.compile(r"'{2,}")  # bold/italic markup that the parser left as text (unbalanced)
# A table that the parser did not recognize (not at a line start): drop it as a block.
_RAW_TABLE = re.compile(r"^\{\|.*?^\|\}", re.DOTALL | re.MULTILINE)
# Brackets left empty by dropped templates or refs: 鲁迅（{{IPA|...}}） -> 鲁迅（）.
_EMPTY_BRACKETS = re.compile(r"[（(][\s，,、；;：:]*[）)]")


def wikitext_to_text(wikitext: str, *, title: str | None = None,
                     today: date | None = None) -> str:
    """Plain text of one article's wikitext: one paragraph, heading or list item per line.

    `title` and `today` stand for what MediaWiki knows when it shows the page: its title
    ({{PAGENAME}}) and the day it is shown, which for a dump is the day the revision was saved
    (`WikiPage.today`). From `today` come the ages counted up to the day of viewing
    ({{age|1990|1|2}}, {{birth date and age}}) and {{CURRENTYEAR}}-style variables, the same on
    every run (a datetime is read as its day). Without them (markup given directly) those are
    dropped: no age, and no date where a number is expected; the two-date
    {{age|1990|1|2|2000|1|1}} needs neither.
    """
    global _nodes
    try:
        import mwparserfromhell
        import mwparserfromhell.nodes
    except ImportError:
        raise UserError("reading wikitext needs mwparserfromhell: "
                        "pip install 'babyllama[clean]'") from None
    _nodes = mwparserfromhell.nodes
    # Citations and comments are dropped anyway; cutting them with a regex first spares the
    # parser (pure Python above its C tokenizer) a third or more of a typical article.
    wikitext = _COMMENT.sub("", wikitext) if "<!--" in wikitext else wikitext
    wikitext = _REF.sub("", wikitext) if "<ref" in wikitext else wikitext
    if isinstance(today, datetime):
        today = today.date()  # the day, in the timestamp's own time zone
    page_token = _PAGE.set(_Page(title, today))
    try:
        text = _render(mwparserfromhell.parse(resolve_conversion(wikitext)))
    except (mwparserfromhell.parser.ParserError, RecursionError):
        # The parser's own internal errors (rare, on pathological markup): an article that
        # cannot be parsed is dropped (empty text fails the length filter) rather than
        # stopping a run over millions of pages.
        return ""
    finally:
        _PAGE.reset(page_token)
    text = _MAGIC_WORD.sub("", text)
    text = _QUOTES.sub("", text)
    if "{|" in text:
        text = _RAW_TABLE.sub("", text)
    text = _EMPTY_BRACKETS.sub("", text)
    # Blank lines between paragraphs carry nothing once every paragraph is its own line.
    lines = (line.strip() for line in text.split("\n"))
    return clean_whitespace("\n".join(line for line in lines if line))
