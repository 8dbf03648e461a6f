"""`babyllama clean` end to end: every kind of bad input skipped and counted, each step's effect
in the output, duplicates gone, the same shards whatever the number of workers."""

from __future__ import annotations

import bz2
import json
import subprocess

import pytest

from conftest import SHARED_DATA, babyllama_cmd, cli_env

pytest.importorskip("opencc")
pytest.importorskip("mwparserfromhell")

from babyllama.data.clean import CleanConfig, clean  # noqa: E402
from babyllama.errors import UserError  # noqa: E402

PARAGRAPHS = [
    "北京是中华人民共和国的首都，也是全国的政治中心和文化中心，有着三千多年的建城史。",
    "长江是中国第一大河，全长约六千三百公里，流经青海、西藏、四川、云南等十一个省级行政区。",
    "人工智能是研究如何让计算机模拟人类智能行为的学科，包括机器学习、自然语言处理等方向。",
    "杭州西湖位于浙江省杭州市西部，以秀丽的湖光山色和众多的名胜古迹而闻名中外，游人如织。",
    "熊猫是中国特有的哺乳动物，主要生活在四川、陕西和甘肃的山区，以竹子为主要食物来源。",
    "唐朝是中国历史上最强盛的朝代之一，首都长安是当时世界上规模最大、人口最多的城市。",
    "黄山位于安徽省南部，以奇松、怪石、云海、温泉四绝著称，被誉为天下第一奇山。",
    "豆腐是以黄豆为主要原料制成的传统食品，相传为西汉淮南王刘安所发明，至今已有两千多年。",
]
LONG = ("丝绸之路是古代连接东西方的贸易通道，起点是长安，经过河西走廊和西域，一直延伸到地中海沿岸。"
        "沿着这条路，中国的丝绸、瓷器和茶叶被运往西方，而西方的玻璃、香料和宗教也传入了中国。"
        "张骞出使西域被认为是丝绸之路正式开通的标志，此后商旅往来不绝，沿途城市日渐繁荣。")
WIKI_PAGE = """'''鲁迅'''（{{bd|1881年|9月25日|1936年|10月19日}}），原名周樟寿，[[浙江]][[绍兴]]人，
中国现代[[文学家]]、[[思想家|思想者]]。<ref>《鲁迅全集》</ref>
{| class="wikitable"
|-
| 表格 || 内容
|}
[[Category:中国作家]]"""


def wiki_dump(pages: list[tuple[str, str]]) -> bytes:
    body = "".join(f"<page><title>{t}</title><ns>0</ns><id>{i}</id><revision><text>{x}</text>"
                   f"</revision></page>" for i, (t, x) in enumerate(pages, 1))
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{body}</mediawiki>'
    return bz2.compress(xml.replace("&", "&amp;").encode("utf-8"))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A folder with one of everything a user's raw corpus has."""
    d = tmp_path_factory.mktemp("raw")
    lines = [{"text": p} for p in PARAGRAPHS[:3]]
    lines.append({"text": PARAGRAPHS[0]})                                   # exact duplicate
    lines.append({"text": LONG})
    lines.append({"text": LONG.replace("张骞", "张蹇").replace("，", ", ", 1)})   # near duplicate
    lines.append({"text": "短"})                                            # too short
    lines.append({"text": "Hello world, this is an English sentence without any Chinese at all."})
    (d / "a.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n{bad json\n",
                               encoding="utf-8")
    (d / "gbk.txt").write_bytes((PARAGRAPHS[3] + "\n").encode("gbk"))
    (d / "big5.txt").write_bytes("熊貓是中國特有的哺乳動物，主要生活在四川、陝西和甘肅的山區，以竹子為主要食物來源。\n"
                                 .encode("big5"))
    (d / "web.txt").write_text("<p>唐朝是中国历史上最强盛的朝代之一，</p><script>x()</script><br>首都长安是当时世界上"
                               "规模最大、人口最多的城市。联系ｅｍａｉｌ：ａ＠ｂ．ｃｏｍ</p>\n", encoding="utf-8")
    (d / "mixed.txt").write_bytes(PARAGRAPHS[6].encode() + b"\n\xff\xfe broken \xc3\x28 line\n"
                                  + PARAGRAPHS[7].encode() + b"\n")
    (d / "empty.txt").write_bytes(b"")
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    (d / "zhwiki.xml.bz2").write_bytes(wiki_dump([("鲁迅", WIKI_PAGE), ("重定向", "#REDIRECT [[鲁迅]]")]))
    return d


def run_clean(raw, out, **options):
    return clean([raw], out, CleanConfig(**{"workers": 0, **options}), progress=False)


def output_texts(out) -> list[str]:
    return [json.loads(line)["text"] for p in sorted(out.glob("part-*.jsonl"))
            for line in p.read_text(encoding="utf-8").splitlines()]


def test_every_input_kind_is_read_skipped_or_counted_and_each_step_shows(raw, tmp_path):
    report = run_clean(raw, tmp_path / "out")
    texts = output_texts(tmp_path / "out")
    joined = "\n".join(texts)
    assert PARAGRAPHS[3] in texts                              # GBK decoded
    assert "熊猫是中国特有的哺乳动物" in joined                   # Big5 decoded, then simplified
    assert "1881年9月25日" in joined and "思想者" in joined      # wiki dates and link text kept
    assert "<ref>" not in joined and "鲁迅全集" not in joined and "wikitable" not in joined
    assert "<p>" not in joined and "x()" not in joined           # HTML and scripts gone
    assert "email：a@b.com" in joined                           # full-width Latin -> ASCII
    assert PARAGRAPHS[7] in texts                              # the line after a broken one
    assert joined.count(PARAGRAPHS[0]) == 1                    # exact duplicate removed
    removed = report["removed"]
    assert removed["exact_duplicate"] == 1 and removed["near_duplicate"] == 1
    assert removed["too_short"] >= 1 and removed["low_chinese"] >= 1
    read = report["read"]
    assert read["bad_lines"] == 1 and read["bad_records"] == 1
    assert any("image.png" in s for s in read["skipped_files"])
    assert report["changed_by_step"]["simplify"] >= 1 and report["changed_by_step"]["wiki"] == 1
    assert LONG in texts and report["documents_out"] == len(texts) == 10
    md = (tmp_path / "out" / "_report.md").read_text(encoding="utf-8")
    assert "| exact_duplicate | 1 |" in md and "## Examples removed" in md and "短" in md


def test_two_workers_write_the_same_shards_as_one(raw, tmp_path):
    run_clean(raw, tmp_path / "one")
    run_clean(raw, tmp_path / "two", workers=2)
    assert output_texts(tmp_path / "one") == output_texts(tmp_path / "two")


def test_options_turn_steps_off(raw, tmp_path):
    report = run_clean(raw, tmp_path / "out", simplify=False, near_dedup=False, mask=True)
    joined = "\n".join(output_texts(tmp_path / "out"))
    assert "熊貓是中國" in joined and "<email>" in joined
    assert report["removed"]["near_duplicate"] == 0 and report["masked_items"] >= 1


def test_output_shards_are_a_corpus_prepare_reads(raw, tmp_path, tiny_tokenizer):
    from babyllama.data.shards import prepare

    run_clean(raw, tmp_path / "clean", shard_mb=1)
    meta = prepare([tmp_path / "clean"], tiny_tokenizer, tmp_path / "data", workers=1, progress=False,
                   val_fraction=0.2)
    assert meta["splits"]["train"]["n_documents"] + meta["splits"]["val"]["n_documents"] == 10


def test_nothing_readable_is_one_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UserError, match="no documents"):
        clean([tmp_path], tmp_path / "out", CleanConfig(workers=0), progress=False)
    with pytest.raises(UserError, match="absent"):
        clean([tmp_path / "absent"], tmp_path / "out", CleanConfig(workers=0), progress=False)
    with pytest.raises(UserError, match="normalize"):
        clean([tmp_path], tmp_path / "out", CleanConfig(normalize="upper"), progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_report_tables(raw, tmp_path):
    result = subprocess.run(babyllama_cmd() + ["clean", str(raw), "-o", str(tmp_path / "out"), "--workers", "0"],
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| removed by | documents | share of input |" in result.stdout and "part-00000.jsonl" in result.stdout
    bad = subprocess.run(babyllama_cmd() + ["clean", str(tmp_path / "nope"), "-o", str(tmp_path / "o")],
                         env=cli_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.skipif(not (SHARED_DATA / "pretrain" / "zhwiki").exists(), reason="needs ../shared/data")
def test_clean_wikipedia_paragraphs_survive_and_a_second_copy_is_all_duplicates(tmp_path):
    src = SHARED_DATA / "pretrain" / "zhwiki" / "paragraphs.jsonl"
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(src.read_bytes())
    report = clean([src, copy], tmp_path / "out", CleanConfig(workers=0), progress=False)
    n = sum(1 for line in src.read_text(encoding="utf-8").splitlines() if line.strip())
    assert report["documents_in"] == 2 * n
    # Every survivor of the first copy is spooled once; its twin in the copy is an exact duplicate.
    assert report["removed"]["exact_duplicate"] == report["documents_out"] + report["removed"]["near_duplicate"]
    assert report["documents_out"] >= 0.9 * n   # an already clean corpus loses little


def test_report_and_console_give_skip_reasons_with_counts_examples_and_the_flag(tmp_path):
    # A folder of alpaca-style JSON files (no `text`) next to a real corpus file.
    data = tmp_path / "data"
    data.mkdir()
    alpaca = [{"instruction": f"问题{i}", "input": "", "output": PARAGRAPHS[i % 8]} for i in range(5)]
    (data / "alpaca.json").write_text(json.dumps(alpaca, ensure_ascii=False), encoding="utf-8")
    (data / "corpus.jsonl").write_text("\n".join(json.dumps({"text": p}, ensure_ascii=False)
                                                 for p in PARAGRAPHS[:3]) + "\n{bad\n", encoding="utf-8")
    report = clean([data], tmp_path / "out", CleanConfig(workers=0), progress=False)
    reasons = report["read"]["bad_record_reasons"]
    assert report["read"]["bad_records"] == 6
    assert reasons["no 'text' field"]["count"] == 5 and reasons["invalid JSON"]["count"] == 1
    first = reasons["no 'text' field"]["examples"][0]
    assert first.startswith(f"{data / 'alpaca.json'}: item 1: no 'text' field (fields: instruction, "
                            "input, output)") and "--text-field output" in first
    md = (tmp_path / "out" / "_report.md").read_text(encoding="utf-8")
    assert "- 5 malformed records: no 'text' field, e.g." in md and "--text-field output" in md
    result = subprocess.run(babyllama_cmd() + ["clean", str(data), "-o", str(tmp_path / "o2"), "--workers", "0"],
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "5 malformed records: no 'text' field" in result.stdout and "--text-field output" in result.stdout


@pytest.mark.skipif(not (SHARED_DATA / "sft" / "alpaca_zh").exists(), reason="needs ../shared/data")
def test_clean_on_real_alpaca_json_says_why_nothing_was_read(tmp_path):
    # The JSON file alone (its folder also holds a README, which clean reads as text).
    src = SHARED_DATA / "sft" / "alpaca_zh" / "zh-data-part-00.json"
    with pytest.raises(UserError) as e:
        clean([src], tmp_path / "out", CleanConfig(workers=0), progress=False)
    message = str(e.value)
    assert "10,021 records skipped" in message and "no 'text' field" in message
    assert "--text-field output" in message and "\n" not in message


def test_clean_refuses_an_output_folder_holding_other_files(raw, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{victim}: exists and holds other files \(e\.g\. "
                                        r"notes\.txt\); choose another -o$"):
        run_clean(raw, victim)
    assert [p.name for p in victim.iterdir()] == ["notes.txt"]
    # An earlier clean output is replaced as before; one a file was added to is not.
    run_clean(raw, tmp_path / "out")
    run_clean(raw, tmp_path / "out")
    (tmp_path / "out" / "keep.md").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match=r"holds other files \(e\.g\. keep\.md\)"):
        run_clean(raw, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "victim"]


def test_no_documents_error_says_how_many_files_it_left_out(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in "abcde":
        (inputs / f"{name}.txt").write_bytes(b"")
    with pytest.raises(UserError, match=r"no documents in \S*a\.txt, \S*b\.txt, \S*c\.txt and 2 more "
                                        r"\(.*c\.txt: empty; 2 more files skipped\)$"):
        clean([inputs], tmp_path / "out", CleanConfig(workers=0), progress=False)


def test_every_document_filtered_out_leaves_no_shards_and_the_report_says_why(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "短"}\n', encoding="utf-8")
    report = clean([src], tmp_path / "c3", CleanConfig(workers=0), progress=False)
    assert report["shards"] == [] and report["documents_out"] == 0
    assert report["removed"]["too_short"] == 1
    md = (tmp_path / "c3" / "_report.md").read_text(encoding="utf-8")
    assert "Shards: none (nothing survived the filters)" in md


def test_an_unclosed_csv_quote_is_counted_as_a_malformed_record(tmp_path):
    src = tmp_path / "a.csv"
    src.write_text(f'text\n{PARAGRAPHS[0]}\n"未闭合的引号,abc\n{PARAGRAPHS[1]}\n', encoding="utf-8")
    report = clean([src], tmp_path / "out", CleanConfig(workers=0), progress=False)
    assert report["documents_in"] == 1 and report["read"]["bad_records"] == 1
    (example,) = report["read"]["bad_record_reasons"]["unclosed quote"]["examples"]
    assert example == f"{src}:3: unclosed quote (the quoted field runs to the end of the file)"
