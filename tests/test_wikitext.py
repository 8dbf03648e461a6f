"""Templates whose output is visible text keep it in `wikitext_to_text` (data/wikitext.py):
parser functions such as {{formatnum:...}}, text passed as `1=`, and the template families
common in zhwiki prose. Unknown templates (boxes, footnotes, maintenance tags) are still dropped.
Ages and date variables are computed as of the revision's timestamp, end to end from a dump.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timezone

import pytest

pytest.importorskip("mwparserfromhell")

from babyllama.data.wikitext import WikiPage, iter_wiki_pages, wikitext_to_text  # noqa: E402

# The two articles of the shared reproduction (cases/wiki-formatnum/zhwiki-sample.xml): every
# number is written with {{formatnum:...}}, one date with {{nowrap|1=...}}.
CITY = ("'''示例市'''是一座虚构的城市，位于一条大河的南岸。2020年人口约为{{formatnum:1234567}}人，"
        "面积{{formatnum:2345.6}}平方公里，冬季最低气温为{{formatnum:-12}}摄氏度。"
        "该市于{{nowrap|1=1998年7月}}设立，下辖三个区。")
LAKE = ("'''示例湖'''是示例市北部的一座湖泊，湖面海拔{{formatnum:1520}}米，最大水深约"
        "{{formatnum:38.5}}米，每年吸引游客约{{formatnum:860000}}人次。")


def test_numbers_and_named_text_of_the_sample_articles_survive():
    city, lake = wikitext_to_text(CITY), wikitext_to_text(LAKE)
    assert city == ("示例市是一座虚构的城市，位于一条大河的南岸。2020年人口约为1,234,567人，"
                    "面积2,345.6平方公里，冬季最低气温为-12摄氏度。该市于1998年7月设立，下辖三个区。")
    assert lake == "示例湖是示例市北部的一座湖泊，湖面海拔1,520米，最大水深约38.5米，每年吸引游客约860,000人次。"
    plain = (city + lake).replace(",", "")
    for value in ("1234567", "2345.6", "-12", "1520", "38.5", "860000", "1998年7月"):
        assert value in plain


@pytest.mark.parametrize("wikitext, expected", [
    # Parser functions / magic words (case-insensitive, spaces around the name ignored).
    ("{{formatnum:1234567}}", "1,234,567"),
    ("{{formatnum:-1234.5678}}", "-1,234.5678"),
    ("{{formatnum:999}}", "999"),
    ("{{ FORMATNUM : 38.5 }}", "38.5"),
    ("{{formatnum:1,234,567|R}}", "1234567"),
    ("{{formatnum:12345|NOSEP}}", "12345"),
    ("约{{formatnum:三千}}人", "约三千人"),                          # not a number: as written
    ("{{lc:ABC}}{{uc:def}}{{lcfirst:XYZ}}{{ucfirst:iphone}}", "abcDEFxYZIphone"),
    ("{{padleft:7|3}}号与{{padright:ab|5|-}}", "007号与ab---"),
    ("{{#tag:span|内文|class=x}}{{#tag:ref|脚注}}", "内文"),
    ("{{#formatdate:2020-01-02}}", "2020-01-02"),
    # `1=` is the first positional argument; the slot written last wins.
    ("{{nowrap|1=a=b}}", "a=b"),
    ("{{nowrap|甲|1=乙}}", "乙"),
    ("{{nowrap|1=乙|甲}}", "甲"),
    ("{{lang|2=Bonjour|1=fr}}与{{lang|en|text=Hi}}", "Bonjour与Hi"),
    ("{{lang-en|1=x = y}}", "x = y"),
    ("{{le|1=仙台|2=Sendai}}", "仙台"),
    ("{{bd|1=1881年|2=9月25日|3=1936年|4=10月19日}}", "1881年9月25日—1936年10月19日"),
    # Template names: first letter's case, "_" for " ", spaces and the namespace don't matter.
    ("{{Nowrap_text_test|x}}{{ nowrap |甲}}{{Template:Nowrap|乙}}{{模板:small|丙}}", "甲乙丙"),
    # Dates and ages (one date: the age on the revision's date, nothing without one; two: the
    # age). The one-date case showed the date here until ages were taken from the timestamp.
    ("建国于{{age|1949|10|1}}", "建国于"),
    ("享年{{age|1881|9|25|1936|10|19}}岁", "享年55岁"),
    ("{{年龄|1900|5|1|1950|4|30}}", "49"),
    # Numbers and units.
    ("第{{ordinal|3}}名", "第3名"),
    ("{{val|1.5|e=6|u=m}}", "1.5×10^6 m"),
    ("{{val|9.8|0.2|ul=m/s2}}", "9.8±0.2 m/s2"),
    ("{{val|38|u=°C}}与{{val|5|+2|-1}}", "38°C与5+2-1"),
    ("{{convert|1=10|2=km}}与{{cvt|3|-|5|kg}}", "10km与3–5kg"),
    # Flags: the country name, nothing for a bare icon.
    ("代表国家：{{CHN}}。", "代表国家：中国。"),
    ("{{JPN}}对{{KOR}}", "日本对韩国"),
    ("{{flagicon|中国}}{{flagdeco|USA}}北京", "北京"),
    ("{{flag|中国}}与{{flag|CHN|name=中华人民共和国}}", "中国与中华人民共和国"),
    ("{{flagcountry|USA}}与{{flagu|法国}}", "美国与法国"),
    # Chinese and Japanese names, fonts and other wrappers.
    ("{{zh|s=中国|t=中國|p=Zhōngguó}}", "简体字：中国；繁体字：中國；汉语拼音：Zhōngguó"),
    ("{{nihongo|东京|東京|Tōkyō}}与{{nihongo2|大阪}}", "东京（東京，Tōkyō）与大阪"),
    ("{{font|text=红字|color=red}}{{font|蓝字|color=blue}}", "红字蓝字"),
    ("{{color|red|警告}}{{font color|red|white|提示}}", "警告提示"),
    # Lists.
    ("{{hlist|甲|乙|丙}}", "甲 · 乙 · 丙"),
    ("{{ubl|甲|乙}}", "甲\n乙"),
    ("{{unbulleted list|1=甲|2=乙}}", "甲\n乙"),
    ("{{plainlist|\n* 甲\n* 乙\n}}", "甲\n乙"),
    ("{{flatlist|1=\n* 甲\n* 乙\n}}", "甲\n乙"),
])
def test_templates_that_render_text_keep_it(wikitext, expected):
    assert wikitext_to_text(wikitext) == expected


@pytest.mark.parametrize("wikitext", [
    "{{Navbox|name=中国城市|title=中国城市|list1=[[北京]]·[[上海]]}}",
    "{{Infobox settlement|name=示例市|population_total={{formatnum:1234567}}}}",
    "{{citation needed|date=2020年1月}}",
    "{{Citation Needed}}{{fact}}{{来源请求}}",
    "{{reflist}}{{coord|39|54|N|116|23|E}}{{IPA|pʰ}}",
    "{{#if:x|显示}}{{#ifeq:a|a|相等}}{{#switch:a|a=甲|乙}}{{#expr:1+1}}{{#time:Y}}",
    "{{#invoke:Math|round|1.5}}{{CURRENTYEAR}}{{PAGENAME}}{{DEFAULTSORT:示例}}",
    "{{Main|示例}}{{See also|示例}}{{sfn|作者|2000}}{{efn|注释}}",
])
def test_templates_that_are_not_prose_are_still_dropped(wikitext):
    assert wikitext_to_text(wikitext + "正文") == "正文"


# A fixed "today": the date a revision was saved (a Friday).
TODAY = date(2020, 5, 1)


@pytest.mark.parametrize("wikitext, expected", [
    # Dates: the Chinese order whatever format is asked for; as written when not a date.
    ("{{date|2020-01-02}}", "2020年1月2日"),
    ("{{date|2020-01-02|ymd}}与{{Date|2020-01-02|mdy}}", "2020年1月2日与2020年1月2日"),
    ("{{date|2 January 2020}}、{{date|January 2, 2020|dmy}}、{{date|Jan 2020}}",
     "2020年1月2日、2020年1月2日、2020年1月"),
    ("{{date|2020年1月2日}}与{{date|某日}}", "2020年1月2日与某日"),
    # {{as of}} as zhwiki shows it; alt= replaces the text.
    ("{{as of|2020}}，人口为100人", "截至2020年，人口为100人"),
    ("{{As of|2020|5}}与{{as of|2010|Apr|1}}", "截至2020年5月与截至2010年4月1日"),
    ("{{as of|2010|4|1|alt=截至人口普查时}}", "截至人口普查时"),
    # Quotations: their own paragraph, the attribution under it.
    ("前文{{quote|学而时习之}}后文", "前文\n学而时习之\n后文"),
    ("{{quote|学而时习之|孔子|论语}}", "学而时习之\n——孔子，论语"),
    ("{{blockquote|text=学而时习之|author=孔子|source=《论语》}}", "学而时习之\n——孔子，《论语》"),
    ("{{Cquote|学而时习之|||孔子|论语}}", "学而时习之\n——孔子，论语"),
    ("{{cquote|quote=学而时习之}}", "学而时习之"),
    # Emphasis, super- and subscripts, mathematics.
    ("{{bold|粗体}}与{{strong|强调}}", "粗体与强调"),
    ("面积为10 km{{sup|2}}，化学式H{{sub|2}}O", "面积为10 km2，化学式H2O"),
    ("{{math|1=''E'' = ''mc''{{sup|2}}}}中{{mvar|c}}为光速", "E = mc2中c为光速"),
    # Addresses: the display text, else the address without its scheme.
    ("官网：{{URL|https://www.example.com/}}", "官网：www.example.com"),
    ("{{URL|example.com|示例网站}}与{{url|http://a.cn/b/}}", "示例网站与a.cn/b/"),
    # Template names as the documentation of templates shows them.
    ("使用{{tl|cite web}}或{{tlx|citation|url{{=}}x}}", "使用{{cite web}}或{{citation|url=x}}"),
    # zhwiki's Chinese-named wrappers (both scripts: zhwiki finds either).
    ("{{小|小字}}与{{黑体|黑体字}}与{{黑體|黑體字}}", "小字与黑体字与黑體字"),
    # Other families of the same kind.
    ("{{lang-zh|s=中国|p=Zhōngguó}}与{{lang-zh|中国}}", "简体字：中国；汉语拼音：Zhōngguó与中国"),
    ("{{transl|zh|Zhōngguó}}与{{script|Cyrl|Москва}}", "Zhōngguó与Москва"),
    ("{{code|x + 1}}、{{var|x}}、{{underline|下划线}}、{{allcaps|nasa}}", "x + 1、x、下划线、NASA"),
    ("{{frac|1|2}}、{{frac|3|1|2}}、{{frac|4}}", "1/2、3 1/2、1/4"),
    ("{{ISBN|978-7-02-000220-7}}", "ISBN 978-7-02-000220-7"),
    ("1990年{{snd}}2000年", "1990年 – 2000年"),
    # Ages between two dates need no revision date.
    ("{{age in years|1990|1|2|2000|1|1}}", "9"),
    ("{{age|1990-01-02|2000-01-01}}", "9"),
])
def test_more_templates_that_show_text_keep_it(wikitext, expected):
    assert wikitext_to_text(wikitext) == expected


@pytest.mark.parametrize("wikitext, expected", [
    # Each wrapper shows the argument its template shows, not the last one.
    ("{{nowrap|甲|乙}}", "甲"),
    ("{{nobr|甲|乙}}", "甲"),
    ("{{small|甲|乙}}{{big|甲|乙}}", "甲甲"),
    ("{{larger|甲|乙}}{{smaller|甲|乙}}", "甲甲"),
    ("{{em|甲|role=x}}{{em|甲|乙}}", "甲甲"),
    ("{{color|red|文字}}{{colour|blue|文字|多余}}", "文字文字"),
    ("{{font color|red|white|文字}}{{font color|red|文字}}{{font color|red|文字|}}", "文字文字文字"),
    ("{{resize|90%|文字}}{{resize|文字}}", "文字文字"),
])
def test_wrappers_show_the_argument_their_template_shows(wikitext, expected):
    assert wikitext_to_text(wikitext) == expected


@pytest.mark.parametrize("wikitext, expected", [
    # One date: the age on the revision's date (2020-05-01).
    ("{{age|1990|1|2}}", "30"),
    ("{{age|1990|5|2}}与{{age|1990|5|1}}", "29与30"),              # the day before the birthday
    ("{{Age|1990-01-02}}与{{年龄|1990|January|2}}", "30与30"),
    ("{{age in years|1949|10|1}}", "70"),
    ("{{birth date and age|1990|12|5}}", "1990年12月5日（29岁）"),
    ("{{出生日期和年龄|1990|1|2}}", "1990年1月2日（30岁）"),
    ("{{age|1990|1|2|2000|1|1}}", "9"),                           # two dates: today unused
    ("{{date}}", "2020年5月1日"),
    # Variables from the title and the revision's date.
    ("{{PAGENAME}}是一座城市", "示例市是一座城市"),
    ("{{FULLPAGENAME}}/{{BASEPAGENAME}}", "示例市/示例市"),
    ("{{CURRENTYEAR}}年{{CURRENTMONTH1}}月{{CURRENTDAY}}日", "2020年5月1日"),
    ("{{CURRENTMONTH}}-{{CURRENTDAY2}}，{{CURRENTMONTHNAME}}，{{CURRENTMONTHNAMEGEN}}",
     "05-01，5月，五月"),
    ("{{CURRENTDAYNAME}}（{{CURRENTDOW}}），第{{CURRENTWEEK}}周", "星期五（5），第18周"),
    ("{{ CURRENTYEAR }}", "2020"),
])
def test_ages_and_variables_are_rendered_as_of_the_revision_date(wikitext, expected):
    assert wikitext_to_text(wikitext, title="示例市", today=TODAY) == expected
    # A datetime (the timestamp itself) is read as its day.
    assert wikitext_to_text(wikitext, title="示例市",
                            today=datetime(2020, 5, 1, 23, 59, tzinfo=timezone.utc)) == expected


@pytest.mark.parametrize("wikitext, expected", [
    # No date given: the age is dropped, never a date where a number is expected.
    ("享年{{age|1990|1|2}}岁", "享年岁"),
    ("{{age in years|1990|1|2}}", ""),
    ("{{birth date and age|1990|12|5}}", "1990年12月5日"),
    ("{{date}}{{CURRENTYEAR}}{{CURRENTDAYNAME}}{{PAGENAME}}", ""),
    # Not a full date: no age either way.
    ("{{age|1990}}{{age|1990|13|1}}{{age|某年}}", ""),
])
def test_ages_and_variables_without_a_revision_date_are_dropped(wikitext, expected):
    assert wikitext_to_text(wikitext) == expected
    if "{{age" in wikitext and "|1990|1|2}}" not in wikitext:
        assert wikitext_to_text(wikitext, today=TODAY) == expected


@pytest.mark.parametrize("wikitext", [
    "{{citation needed|date=2020年1月}}{{fact}}{{来源请求}}{{clarify}}{{when}}",
    "{{update after|2034}}{{dated info|2020}}",
    # {{#expr:}} and {{#time:}} stay dropped (see the comment above _VARIABLES), even with a date.
    "{{#expr:1+2}}{{#expr:{{CURRENTYEAR}}-1949}}{{#time:Y}}",
    # The local time zone and the time of day are not in a dump; {{pagename}} is a template.
    "{{LOCALYEAR}}{{CURRENTTIME}}{{CURRENTHOUR}}{{pagename}}",
])
def test_maintenance_tags_and_logic_stay_dropped_with_a_revision_date(wikitext):
    assert wikitext_to_text(wikitext + "正文", title="示例市", today=TODAY) == "正文"


def _export(pages: list[tuple[str, str | None, str]]) -> str:
    """A MediaWiki XML export: (title, revision timestamp or None, wikitext) per page."""
    body = "".join(
        f"<page><title>{title}</title><ns>0</ns><id>{i}</id><revision><id>{i}0</id>"
        + (f"<timestamp>{stamp}</timestamp>" if stamp else "")
        + f'<contributor><username>x</username></contributor><text xml:space="preserve">{text}'
          "</text></revision></page>"
        for i, (title, stamp, text) in enumerate(pages, 1))
    return ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" '
            'xml:lang="zh"><siteinfo><sitename>维基百科</sitename></siteinfo>' + body
            + "</mediawiki>")


BIOGRAPHY = ("'''{{PAGENAME}}'''生于{{birth date|1990|1|2}}，现年{{age|1990|1|2}}岁，"
             "{{CURRENTYEAR}}年在世。")
PAGES = [("张三", "2020-05-01T12:00:00Z", BIOGRAPHY),
         ("李四", "2021-01-03T00:00:00Z", BIOGRAPHY),
         ("王五", None, BIOGRAPHY)]


def test_iter_wiki_pages_reads_the_revision_timestamp(tmp_path):
    (tmp_path / "zhwiki.xml").write_text(_export(PAGES), encoding="utf-8")
    pages = list(iter_wiki_pages(tmp_path / "zhwiki.xml"))
    assert pages[0] == WikiPage("张三", BIOGRAPHY, datetime(2020, 5, 1, 12, tzinfo=timezone.utc))
    assert [p.today for p in pages] == [date(2020, 5, 1), date(2021, 1, 3), None]


@pytest.mark.parametrize("workers", [0, 2])
def test_clean_renders_one_date_ages_as_of_each_revision(tmp_path, workers):
    from babyllama.data.clean import CleanConfig, clean

    (tmp_path / "zhwiki.xml").write_text(_export(PAGES), encoding="utf-8")
    cfg = CleanConfig(simplify=False, min_chars=1, near_dedup=False, exact_dedup=False,
                      workers=workers)
    clean([tmp_path / "zhwiki.xml"], tmp_path / "out", cfg, progress=False)
    texts = [json.loads(line)["text"] for line in
             (tmp_path / "out" / "part-00000.jsonl").read_text(encoding="utf-8").splitlines()]
    assert texts == ["张三生于1990年1月2日，现年30岁，2020年在世。",
                     "李四生于1990年1月2日，现年31岁，2021年在世。",   # a later revision: older
                     "王五生于1990年1月2日，现年岁，年在世。"]         # no timestamp: no age
