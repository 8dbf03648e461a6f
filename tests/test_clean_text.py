"""Text-cleaning building blocks: transforms and filters (clean_text), Wikipedia dumps and
markup (wikitext), and reading files of unknown encoding (encoding)."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import random
import sys

import pytest

from conftest import SHARED_DATA
from babyllama.data import clean_text as ct
from babyllama.data.clean_text import (FILTERS, FilterConfig, chinese_ratio, clean_whitespace,
                                       filter_reason, junk_ratio, mask_pii, normalize_nfkc,
                                       normalize_width, repeated_line_ratio, strip_html,
                                       to_simplified)
from babyllama.data.encoding import TextFile, detect_encoding, iter_text_lines
from babyllama.errors import UserError

ZHWIKI = SHARED_DATA / "pretrain" / "zhwiki" / "paragraphs.jsonl"
LCCC = SHARED_DATA / "sft" / "lccc" / "toy_train.txt"
CSL = SHARED_DATA / "summarization" / "csl" / "ts_dev.tsv"

SIMPLIFIED = ("鲁迅，本名周樟寿，浙江绍兴人，中国现代著名作家、思想家。\n"
              "他的作品包括小说集《呐喊》《彷徨》，散文集《朝花夕拾》等。\n"
              "一九一八年发表的《狂人日记》是中国第一篇现代白话小说。\n")
TRADITIONAL = ("魯迅，本名周樟壽，浙江紹興人，中國現代著名作家、思想家。\n"
               "他的作品包括小說集《吶喊》《彷徨》，散文集《朝花夕拾》等。\n"
               "一九一八年發表的《狂人日記》是中國第一篇現代白話小說。\n")


# ---------------------------------------------------------------------------------------------
# Transforms


def test_normalize_width_converts_latin_and_digits_and_keeps_chinese_punctuation():
    punctuation = "，。！？：；（）《》“”‘’、…—　％"
    assert normalize_width("ＧＰＴ－４ｏ发布于２０２４年" + punctuation) == "GPT-4o发布于2024年" + punctuation
    assert normalize_width("邮箱ａ＠ｂ．ｃｏｍ，价格３．５元．") == "邮箱a@b.com，价格3.5元．"
    assert normalize_width("苹果／香蕉") == "苹果／香蕉"      # ／ between Chinese words stays
    plain = "没有全角字母的文本。"
    assert normalize_width(plain) is plain                # fast path: nothing to do
    assert normalize_nfkc("ＡＢ，。（１）") == "AB,。(1)"   # the opt-in that folds punctuation


def test_to_simplified_and_a_clear_error_without_opencc(monkeypatch):
    pytest.importorskip("opencc")
    assert to_simplified(TRADITIONAL) == SIMPLIFIED
    monkeypatch.setattr(ct, "_t2s", None)
    monkeypatch.setitem(sys.modules, "opencc", None)      # import opencc -> ImportError
    with pytest.raises(UserError, match=r"opencc: pip install 'babyllama\[clean\]'"):
        to_simplified("電腦")


def test_clean_whitespace():
    raw = ("\ufeff  第一段\u200b第一行\t\t有  多个\u00a0\u00a0空格  \r\n"
           "第二行\x00\x07带控制字符\u00ad\r\r\n\n\n"
           "　　第二段用全角空格缩进，姓名　张三 \x0c第三段\n\n\n\n")
    assert clean_whitespace(raw) == ("第一段第一行 有 多个 空格\n第二行带控制字符\n\n"
                                     "第二段用全角空格缩进，姓名　张三\n第三段")
    assert clean_whitespace("  \n\t \n") == ""


def test_strip_html_removes_markup_but_not_text_that_looks_like_it():
    page = ("<!DOCTYPE html><html><head><title>标题</title><style>p {color: red}</style>"
            "<script type='text/javascript'>if (a < b) { x(); }</script></head>"
            "<body><div class=\"main\" onclick=\"f('>')\"><p>第一段<b>加粗</b>&amp;实体&nbsp;"
            "&#x4e2d;</p><!-- 注释 --><br/>第二段<ul><li>项一</li><li>项二</li></ul>"
            "<table><tr><td>甲</td><td>乙</td></tr></table></div></body></html>")
    lines = [line.strip() for line in strip_html(page).splitlines() if line.strip()]
    assert lines == ["标题", "第一段加粗&实体\u00a0中", "第二段", "项一", "项二", "甲  乙"]
    for text in ("a < b 且 c > d", "1<2>3", "List<String> 与 Map<K, V>", "x<-5", "<<三体>>"):
        assert strip_html(text) == text
    assert strip_html("&lt;b&gt;不是标签&lt;/b&gt;") == "<b>不是标签</b>"


def test_mask_pii_masks_emails_and_phones_but_not_other_numbers():
    text = ("联系张三：zhang.san+work@mail.example.com.cn或13812345678，"
            "李四+86 139-1234-5678、王五 150 1234 5678，办公室010-12345678和0755-1234567。")
    masked, n = mask_pii(text)
    assert masked == ("联系张三：<email>或<phone>，李四<phone>、王五 <phone>，办公室<phone>和<phone>。")
    assert n == 6
    untouched = ("身份证号110101199003071234，订单号2013812345678901，"
                 "年份2013 2014 2015，编号12345678901，比分3-1，价格1380元。")
    assert mask_pii(untouched) == (untouched, 0)


# ---------------------------------------------------------------------------------------------
# Measures and filters


def test_measures():
    assert chinese_ratio("中文abc") == pytest.approx(2 / 5)
    assert chinese_ratio("中 文\n\u3000") == 1.0 and chinese_ratio(" \n") == 0.0
    assert chinese_ratio("𠀀𠀁ab") == 0.5                       # CJK extension B counts
    assert repeated_line_ratio("一行") == 0.0
    assert repeated_line_ratio("点击关注\n正文内容\n点击关注\n\n点击关注") == pytest.approx(8 / 16)
    assert junk_ratio("正常的中文句子，带标点（括号）“引号”和English words.") == 0.0
    assert junk_ratio("■■■★★★你好") == pytest.approx(6 / 8)
    assert junk_ratio("锟斤拷锟斤拷文本\ufffd") == pytest.approx(7 / 9)
    assert junk_ratio("😀😀😀😀哈哈") == pytest.approx(4 / 6)
    assert junk_ratio("|||~~~^^^ab") == pytest.approx(9 / 11)


def test_filter_reason_names_the_first_failing_filter():
    cfg = FilterConfig().check()
    good = "北京是中华人民共和国的首都，也是全国的政治中心和文化中心。"
    assert filter_reason(good, cfg) is None
    assert filter_reason("太短了", cfg) == "too_short"
    assert filter_reason(good * 10_000, cfg) == "too_long"
    english = "This document is written in English only, no Chinese."
    assert filter_reason(english, cfg) == "low_chinese"
    assert filter_reason("\n".join([good] * 3), cfg) == "repeated_lines"
    assert filter_reason(good + "★" * 30, cfg) == "junk"
    assert FILTERS == ("too_short", "too_long", "low_chinese", "repeated_lines", "junk")
    # Thresholds at their limits disable a filter.
    off = FilterConfig(min_chinese_ratio=0, max_repeated_line_ratio=1, max_junk_ratio=1)
    assert filter_reason("English text, long enough ★★★★★★★★★★★★★★★★★★", off) is None


@pytest.mark.parametrize("field, value", [("min_chars", -1), ("max_chars", 10),
                                          ("max_chars", float("inf")), ("min_chars", 2.5),
                                          ("min_chinese_ratio", 1.5), ("max_junk_ratio", "x"),
                                          ("max_repeated_line_ratio", -0.1)])
def test_filter_config_check_names_the_bad_field(field, value):
    with pytest.raises(UserError, match=field):
        FilterConfig(**{field: value}).check()


def _chain(text: str, cfg: FilterConfig) -> tuple[str, str | None]:
    text = clean_whitespace(to_simplified(normalize_width(strip_html(text))))
    return text, filter_reason(text, cfg)


@pytest.mark.skipif(not ZHWIKI.exists(), reason="needs ../shared/data")
def test_clean_wikipedia_paragraphs_pass_the_default_filters_unchanged_in_substance():
    pytest.importorskip("opencc")
    docs = [json.loads(line)["text"] for line in ZHWIKI.read_text(encoding="utf-8").splitlines()]
    cfg = FilterConfig()
    results = [_chain(d, cfg) for d in docs]
    reasons = [r for _, r in results if r]
    assert len(reasons) <= 0.03 * len(docs), reasons
    assert not any(r in ("junk", "repeated_lines") for r in reasons)
    # Already simplified, clean text: the chain changes little (spaces, full-width letters).
    same = sum(text == clean_whitespace(d) for (text, _), d in zip(results, docs))
    assert same >= 0.9 * len(docs)


@pytest.mark.skipif(not (LCCC.exists() and CSL.exists()), reason="needs ../shared/data")
def test_real_dialogue_and_abstract_files_read_and_mostly_pass():
    lccc = TextFile(LCCC)
    assert lccc.encoding == "utf-8" and lccc.skipped is None
    lines = [text for _, text in lccc.lines()]
    assert lccc.stats["lines"] == len(lines) == 10_000 and lccc.stats["bad_lines"] == 0
    # LCCC is one character per token ("为 什 么"): Chinese but short; most lines are kept.
    kept = sum(filter_reason(clean_whitespace(t), FilterConfig(min_chars=5)) is None for t in lines)
    assert kept >= 0.8 * len(lines)
    abstracts = [t for _, t in iter_text_lines(CSL)]
    assert len(abstracts) == 1000
    # CSL abstracts mix ASCII punctuation into Chinese; width normalization leaves it alone.
    assert sum(filter_reason(normalize_width(t), FilterConfig()) is None for t in abstracts) >= 950


# ---------------------------------------------------------------------------------------------
# Wikitext

ARTICLE = """{{NoteTA|G1=IT|1=zh-hans:计算机; zh-hant:電腦;}}
{{Infobox writer
| name        = 鲁迅
| image       = Lu Xun 1930.jpg
| birth_date  = {{birth date|1881|9|25}}
| birth_place = [[绍兴]]
}}
'''鲁迅'''（{{bd|1881年|9月25日|1936年|10月19日}}），原名'''周樟寿'''，[[浙江省|浙江]][[绍兴]]人，\
{{lang|en|Lu Xun}}，中国现代[[文学家]]、[[思想家|思想者]]<ref name="bio">{{cite book|title=鲁迅传\
|publisher=人民文学出版社|year=2005}}</ref>。他曾学习-{zh-hans:计算机; zh-hant:電腦;}-以外的\
-{zh-cn:医学; zh-tw:醫學;}-。<ref name="bio"/>-{H|zh-hans:软件; zh-hant:軟體;}-__TOC__

== 生平 ==
[[File:Lu Xun 1930.jpg|thumb|upright|1930年的鲁迅]]
1902年赴[[日本]]留学，就读于{{le|仙台医学专门学校|Sendai Medical College}}，\
师从{{link-ja|藤野严九郎|藤野厳九郎}}。<!-- 待补充 -->\
其弟[[周作人]]生于{{出生日期|1885|1|16}}，卒于{{death date and age|1967|5|6|1885|1|16}}。

=== 作品 ===
* 《[[呐喊 (小说集)|呐喊]]》
* 《[[彷徨]]》{{Citation needed|date=2020年1月}}

{| class="wikitable"
! 年份 !! 作品
|-
| 1918 || [[狂人日记]]
|}
[[Image:Signature.svg|签名]]
<gallery>
LuXun.jpg|故居
</gallery>

== 参考文献 ==
{{reflist}}
* 《鲁迅全集》，人民文学出版社

== 外部链接 ==
* [http://www.luxunmuseum.com.cn 北京鲁迅博物馆]

[[Category:中国作家]]
[[分类:绍兴人]]
[[en:Lu Xun]]
[[ja:魯迅]]
"""


def test_wikitext_to_text_keeps_dates_and_link_texts_and_drops_markup():
    pytest.importorskip("mwparserfromhell")
    from babyllama.data.wikitext import wikitext_to_text

    text = wikitext_to_text(ARTICLE)
    assert text.splitlines() == [
        "鲁迅（1881年9月25日—1936年10月19日），原名周樟寿，浙江绍兴人，Lu Xun，中国现代文学家、思想者。"
        "他曾学习计算机以外的医学。",
        "生平",
        "1902年赴日本留学，就读于仙台医学专门学校，师从藤野严九郎。其弟周作人生于1885年1月16日，卒于1967年5月6日。",
        "作品",
        "《呐喊》",
        "《彷徨》",
    ]


@pytest.mark.parametrize("wikitext, expected", [
    ("-{zh-hans:计算机; zh-hant:電腦;}-", "计算机"),
    ("-{zh-tw:電腦;zh-cn:计算机}-", "计算机"),
    ("-{zh-hk:電腦; zh-tw:計算機;}-", "電腦"),                  # no simplified variant: the first
    ("英特尔-{H|zh-cn:英特尔; zh-tw:英特爾;}-公司", "英特尔公司"),  # a hidden page-wide rule
    ("-{A|zh-hans:英特尔; zh-hant:英特爾;}-公司", "英特尔公司"),   # a rule that also displays
    ("-{T|zh-hans:标题; zh-hant:標題;}-正文", "正文"),
    ("-{漢字}-与-{R|zh-hans:不转换}-", "漢字与zh-hans:不转换"),
    ("{{bd|1950年|3月1日||}}", "1950年3月1日—"),
    ("{{birth date and age|1990|12|05|df=y}}", "1990年12月5日"),
    ("{{birth date|1900年1月2日}}", "1900年1月2日"),
    ("{{lang-en|Hello}}与{{langx|fr|Bonjour}}", "Hello与Bonjour"),
    ("{{tsl|en|Foreign Title|外文标题}}", "外文标题"),
    ("{{Internal link helper/en|中文名|English}}", "中文名"),
    ("{{convert|10|km|mi}}长", "10km长"),
    ("{{Infobox|a=1}}{{coord|1|2}}{{#if:x|y}}正文", "正文"),
    ("[[:Category:作家|作家分类]]与[[wikt:书|书]]", "作家分类与书"),
    ("[http://a.cn 网站]与[http://a.cn]与 http://a.cn/x", "网站与与 http://a.cn/x"),
    ("鲁迅（{{IPA|lu xun}}）是作家<ref>来源</ref>。", "鲁迅是作家。"),
    ("第一行<br />第二行\n# 有序\n: 缩进", "第一行\n第二行\n有序\n缩进"),
])
def test_wikitext_templates_conversion_and_links(wikitext, expected):
    pytest.importorskip("mwparserfromhell")
    from babyllama.data.wikitext import wikitext_to_text

    assert wikitext_to_text(wikitext) == expected


def _dump_xml(pages: list[tuple[str, int, str, bool]]) -> str:
    body = "".join(
        f"<page><title>{title}</title><ns>{ns}</ns><id>{i}</id>"
        + ('<redirect title="鲁迅" />' if redirect else "")
        + f'<revision><id>{i}</id><text bytes="1" xml:space="preserve">{text}</text>'
          "</revision></page>"
        for i, (title, ns, text, redirect) in enumerate(pages, 1))
    return ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" '
            'xml:lang="zh"><siteinfo><sitename>维基百科</sitename></siteinfo>' + body + "</mediawiki>")


def test_iter_wiki_dump_reads_articles_only(tmp_path):
    from babyllama.data.wikitext import iter_wiki_dump

    xml = _dump_xml([("鲁迅", 0, "'''鲁迅'''是作家&lt;ref&gt;x&lt;/ref&gt;。", False),
                     ("周树人", 0, "#重定向 [[鲁迅]]", True),
                     ("Talk:鲁迅", 1, "讨论页", False),
                     ("周作人", 0, "'''周作人'''是[[鲁迅]]之弟。", False)])
    (tmp_path / "zhwiki.xml.bz2").write_bytes(bz2.compress(xml.encode("utf-8")))
    (tmp_path / "zhwiki.xml").write_text(xml, encoding="utf-8")
    for name in ("zhwiki.xml.bz2", "zhwiki.xml"):
        pages = list(iter_wiki_dump(tmp_path / name))
        assert pages == [("鲁迅", "'''鲁迅'''是作家<ref>x</ref>。"), ("周作人", "'''周作人'''是[[鲁迅]]之弟。")]


@pytest.mark.parametrize("name, content, match", [
    ("notes.xml", b"just some text, not XML", "not a valid MediaWiki XML dump"),
    ("page.xml", b"<html><body>hi</body></html>", "root element is <html>"),
    ("cut.xml", _dump_xml([("a", 0, "b", False)]).encode()[:-40], "not a valid MediaWiki XML dump"),
    ("bad.xml.bz2", b"BZh9 not really bzip2", "cannot read"),
    ("empty.xml", b"", "not a valid MediaWiki XML dump"),
])
def test_iter_wiki_dump_names_the_file_it_cannot_read(tmp_path, name, content, match):
    from babyllama.data.wikitext import iter_wiki_dump

    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=match) as info:
        list(iter_wiki_dump(tmp_path / name))
    assert name in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Encodings


@pytest.mark.parametrize("encoding, text, detected", [
    ("utf-8", SIMPLIFIED, "utf-8"),
    ("utf-8-sig", SIMPLIFIED, "utf-8-sig"),
    ("utf-16", SIMPLIFIED, "utf-16"),
    ("gbk", SIMPLIFIED, "gb18030"),
    ("gb2312", SIMPLIFIED, "gb18030"),
    ("gb18030", SIMPLIFIED + "𠀀𠀁€镕\n", "gb18030"),   # 4-byte GB18030 characters beyond GBK
    ("big5", TRADITIONAL, "big5"),
], ids=["utf-8", "utf-8-bom", "utf-16", "gbk", "gb2312", "gb18030", "big5"])
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
def test_text_file_detects_and_decodes_chinese_encodings(tmp_path, encoding, text, detected,
                                                         compressed):
    data = text.replace("\n", "\r\n" if encoding == "gbk" else "\n").encode(encoding)
    path = tmp_path / ("f.txt.gz" if compressed else "f.txt")
    path.write_bytes(gzip.compress(data) if compressed else data)
    tf = TextFile(path)
    assert (tf.encoding, tf.skipped) == (detected, None)
    lines = list(tf.lines())
    assert [t for _, t in lines] == text.splitlines()
    assert [n for n, _ in lines] == list(range(1, len(lines) + 1))
    assert tf.stats == {"lines": len(lines), "bad_lines": 0, "long_lines": 0, "truncated": 0}


def test_a_bad_line_in_utf8_is_skipped_and_counted(tmp_path):
    lines = SIMPLIFIED.splitlines()
    path = tmp_path / "mixed.txt"
    path.write_bytes(lines[0].encode() + b"\n\xff\xfe broken \xc3\x28 line\n"
                     + "\n".join(lines[1:]).encode() + b"\n")
    tf = TextFile(path)
    assert tf.encoding == "utf-8"
    assert list(tf.lines()) == [(1, lines[0]), (3, lines[1]), (4, lines[2])]
    assert tf.stats["bad_lines"] == 1 and tf.stats["lines"] == 3
    # A bad line after the 64 KB sample: detection said UTF-8, the line is still only counted.
    big = tmp_path / "late.txt"
    big.write_bytes(("正常的一行文字。\n" * 5000).encode() + "坏行".encode("gbk") + b"\nlast\n")
    tf = TextFile(big)
    assert tf.encoding == "utf-8" and list(tf.lines())[-1] == (5002, "last")
    assert tf.stats == {"lines": 5001, "bad_lines": 1, "long_lines": 0, "truncated": 0}


def test_an_over_long_line_is_skipped_without_being_held(tmp_path):
    path = tmp_path / "long.txt"
    with open(path, "wb") as f:
        f.write("第一行\n".encode())
        f.write(b"x" * (20 << 20) + b"\n")
        f.write("最后一行\n".encode())
    tf = TextFile(path, max_line_bytes=1 << 20)
    assert list(tf.lines()) == [(1, "第一行"), (3, "最后一行")]
    assert tf.stats == {"lines": 2, "bad_lines": 0, "long_lines": 1, "truncated": 0}
    edge = tmp_path / "edge.txt"   # exactly the limit is fine, one byte more is not
    edge.write_bytes(b"a" * 100 + b"\r\n" + b"b" * 101 + b"\n" + b"c" * 101)
    tf = TextFile(edge, max_line_bytes=100)
    assert list(tf.lines()) == [(1, "a" * 100)] and tf.stats["long_lines"] == 2


def test_empty_binary_and_missing_files(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    tf = TextFile(tmp_path / "empty.txt")
    assert tf.skipped == "empty" and list(tf.lines()) == []
    rng = random.Random(0)
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(rng.randrange(256) for _ in range(4096))
    (tmp_path / "image.txt").write_bytes(png)
    tf = TextFile(tmp_path / "image.txt")
    assert (tf.skipped, tf.encoding) == ("binary", None) and list(tf.lines()) == []
    assert detect_encoding(png) is None and detect_encoding(b"plain ascii") == "utf-8"
    (tmp_path / "latin1.txt").write_bytes("café à la crème, naïve résumé".encode("latin-1"))
    assert TextFile(tmp_path / "latin1.txt").skipped == "unknown_encoding"
    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip at all")
    assert TextFile(tmp_path / "bad.txt.gz").skipped == "unreadable"
    with pytest.raises(UserError, match="absent.txt: no such file"):
        TextFile(tmp_path / "absent.txt")


def test_a_truncated_gzip_yields_what_it_can(tmp_path):
    data = gzip.compress(("中文行\n" * 20_000).encode())
    path = tmp_path / "cut.txt.gz"
    path.write_bytes(data[: len(data) // 2])
    tf = TextFile(path)
    assert tf.encoding == "utf-8"
    lines = list(tf.lines())
    assert 0 < len(lines) < 20_000 and all(t == "中文行" for _, t in lines[:-1])
    assert tf.stats["truncated"] == 1


def test_text_file_is_picklable_for_worker_processes(tmp_path):
    import pickle

    path = tmp_path / "a.txt"
    path.write_bytes(SIMPLIFIED.encode("gbk"))
    tf = pickle.loads(pickle.dumps(TextFile(path)))
    assert [t for _, t in tf.lines()] == SIMPLIFIED.splitlines()
    assert os.fspath(tf.path) == os.fspath(path)
