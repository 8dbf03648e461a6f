"""Wikipedia dumps and wikitext -> plain text.

- `iter_wiki_dump(path)` streams (title, wikitext) of the articles in a MediaWiki XML dump
  (`pages-articles.xml` or `.xml.bz2`), namespace 0 only, redirects skipped, memory flat.
- `wikitext_to_text(wikitext)` renders one article's visible prose with mwparserfromhell.

Why not gensim's `wikicorpus`: it deletes every `{{...}}` template with a regex. On zhwiki the
birth and death dates of every biography live in templates
(`{{bd|1881年|9月25日|1936年|10月19日}}`, `{{birth date|1900|1|2}}`), and so do the local names of
foreign-language links (`{{le|中文|English}}`) and foreign terms (`{{lang|en|...}}`), so
sentences came out as "鲁迅（），浙江人". Its regexes also leave `<ref>` bodies and table cells
behind. Here the parse tree is walked instead: templates are dropped except a known list whose
output is text (dates, language and link helpers), which are rendered the way zhwiki shows
them; refs, tables, galleries, files, categories, interlanguage links and the reference /
external-link sections at the end of articles are dropped.

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
from pathlib import Path
from typing import Callable, Iterator

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


def _article(page: ET.Element) -> tuple[str, str] | None:
    """(title, wikitext) of a <page> element, or None for redirects and other namespaces."""
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
    return (title.text or "").strip(), text.text


def iter_wiki_dump(path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of every article (namespace 0, not a redirect) of a MediaWiki XML dump,
    plain or compressed (.bz2, .gz). A file that is not such a dump raises UserError."""
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


def _positional(template) -> list[str]:
    return [_render(p.value).strip() for p in template.params if not p.showkey]


def _arg(args: list[str], i: int) -> str:
    return args[i] if i < len(args) else ""


def _birth_death(template) -> str:
    """{{bd|1881年|9月25日|1936年|10月19日}} -> 1881年9月25日—1936年10月19日 (— alone when living)."""
    a = _positional(template)
    birth, death = _arg(a, 0) + _arg(a, 1), _arg(a, 2) + _arg(a, 3)
    return f"{birth}—{death}" if birth or death else ""


def _ymd(template) -> str:
    """{{birth date|1900|1|2}} -> 1900年1月2日; the first date of the *and age* variants."""
    a = [x for x in _positional(template) if x]
    if not a:
        return ""
    if not a[0].isdigit():
        return a[0]  # {{birth date|1900年1月2日}}: already text
    parts = [f"{int(a[0])}年"]
    for value, unit in zip(a[1:3], "月日"):
        if not value.isdigit():
            break
        parts.append(f"{int(value)}{unit}")
    return "".join(parts)


def _param(i: int) -> Callable:
    return lambda template: _arg(_positional(template), i)


def _last(template) -> str:
    a = _positional(template)
    return a[-1] if a else ""


def _tsl(template) -> str:
    """{{tsl|en|Foreign title|本地标题|显示文字}}: the displayed (else local) title."""
    a = _positional(template)
    return _arg(a, 3) or _arg(a, 2) or _arg(a, 1)


def _convert_units(template) -> str:
    """{{convert|10|km|mi}} -> 10km; {{convert|1|-|2|km}} -> 1–2km (no conversion shown)."""
    a = _positional(template)
    if _arg(a, 1) in ("-", "–", "to", "and", "~", "至", "到"):
        return f"{_arg(a, 0)}–{_arg(a, 2)}{_arg(a, 3)}"
    return _arg(a, 0) + _arg(a, 1)


_DATE_TEMPLATES = ("birth date", "birth date and age", "death date", "death date and age",
                   "birth year and age", "death year and age", "start date", "end date",
                   "start date and age", "dob", "bda", "dda", "出生日期", "出生日期和年龄",
                   "出生日期和年齡", "逝世日期", "逝世日期和年龄", "逝世日期和年齡", "死亡日期",
                   "死亡日期和年龄", "死亡日期和年齡")
_TEMPLATES: dict[str, Callable] = {
    "bd": _birth_death,
    **{name: _ymd for name in _DATE_TEMPLATES},
    "lang": _param(1), "langx": _param(1),
    "le": _param(0), "ill": _param(0), "ilh": _param(0), "interlanguage link": _param(0),
    "interlanguage link multi": _param(0), "tsl": _tsl,
    "translink": _tsl, "abbr": _param(0), "ruby": _param(0),
    "nowrap": _last, "nobr": _last, "small": _last, "big": _last, "larger": _last,
    "smaller": _last, "color": _last, "colour": _last, "font color": _last, "em": _last,
    "convert": _convert_units, "cvt": _convert_units,
    "!": lambda t: "|", "=": lambda t: "=", "·": lambda t: "·", "ndash": lambda t: "–",
    "mdash": lambda t: "—",
}
# Families by prefix: {{lang-en|text}}, {{link-en|中文|English}}, {{internal link helper/en|...}}.
_TEMPLATE_PREFIXES = (("lang-", _param(0)), ("link-", _param(0)),
                      ("internal link helper", _param(0)))
_TEMPLATE_NAMESPACE = re.compile(r"^(?:template|模板|样板|樣板)\s*:\s*", re.IGNORECASE)


def _template_name(template) -> str:
    name = " ".join(str(template.name).replace("_", " ").split()).lower()
    return _TEMPLATE_NAMESPACE.sub("", name)


def _render_template(template) -> str:
    name = _template_name(template)
    handler = _TEMPLATES.get(name)
    if handler is None:
        handler = next((h for prefix, h in _TEMPLATE_PREFIXES if name.startswith(prefix)), None)
    return handler(template) if handler is not None else ""


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


def wikitext_to_text(wikitext: str) -> str:
    """Plain text of one article's wikitext: one paragraph, heading or list item per line."""
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
    try:
        text = _render(mwparserfromhell.parse(resolve_conversion(wikitext)))
    except (mwparserfromhell.parser.ParserError, RecursionError):
        # The parser's own internal errors (rare, on pathological markup): an article that
        # cannot be parsed is dropped (empty text fails the length filter) rather than
        # stopping a run over millions of pages.
        return ""
    text = _MAGIC_WORD.sub("", text)
    text = _QUOTES.sub("", text)
    if "{|" in text:
        text = _RAW_TABLE.sub("", text)
    text = _EMPTY_BRACKETS.sub("", text)
    # Blank lines between paragraphs carry nothing once every paragraph is its own line.
    lines = (line.strip() for line in text.split("\n"))
    return clean_whitespace("\n".join(line for line in lines if line))
