"""Templates whose output is visible text keep it in `wikitext_to_text` (data/wikitext.py):
parser functions such as {{formatnum:...}}, text passed as `1=`, and the template families
common in zhwiki prose. Unknown templates (boxes, footnotes, maintenance tags) are still dropped.
"""

from __future__ import annotations

import pytest

pytest.importorskip("mwparserfromhell")

from babyllama.data.wikitext import wikitext_to_text  # noqa: E402

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
    # Dates and ages (one date: the date, since "today" is not in a dump; two: the age).
    ("建国于{{age|1949|10|1}}", "建国于1949年10月1日"),
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
